"""A model's settings in HF's terms and Megatron's, from each family's table (pipeline/models/<family>.py):
model.* -> an HF config (`model_config`), an HF config.json -> model.* (`model_from_hf`, refusing any
field the family neither maps, fixes nor ignores), and the geometry rules both sides share (the padded
embedding, the FFN size, the head size)."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Dict

from pipeline.config import ModelConfig
from pipeline.errors import ConversionError
from pipeline.models import FAMILIES, by_name
from pipeline.models.mapping import Family

# HF config field per schema field, for each family (RoPE's in rope_parameters: `rope_parameters`).
CONFIG_FIELDS = {name: family.hf_fields for name, family in FAMILIES.items()}
ROPE_FIELDS = {"rope_scaling_factor": "factor", "rope_low_freq_factor": "low_freq_factor",
               "rope_high_freq_factor": "high_freq_factor",
               "rope_original_max_position_embeddings": "original_max_position_embeddings"}
ROPE_KEYS = {"none": (), "linear": ("rope_scaling_factor",), "llama3": tuple(ROPE_FIELDS)}  # ours -> HF rope_type
HF_ROPE_TYPE = {"none": "default", "linear": "linear", "llama3": "llama3"}


def head_dim(model: Dict[str, Any]) -> int:
    return model.get("head_dim") or model["hidden_size"] // model["num_attention_heads"]


def rope_parameters(model: Dict[str, Any]) -> Dict[str, Any]:
    """HF's rope_parameters (transformers 5) of model.*: theta, type and the type's parameters."""
    scaling = model.get("rope_scaling") or "none"
    params = {"rope_type": HF_ROPE_TYPE[scaling], "rope_theta": float(model["rope_theta"])}
    params.update({ROPE_FIELDS[k]: model[k] for k in ROPE_KEYS[scaling]})
    return params


def model_config(model: Dict[str, Any], vocab_size: int, eod_id: int):
    from transformers import AutoConfig

    family = by_name(model["family"])
    kwargs = {hf: model[ours] for ours, hf in family.hf_fields.items() if model.get(ours) is not None}
    if family.rope:
        kwargs["rope_parameters"] = rope_parameters(model)
    return AutoConfig.for_model(family.hf_model_type, vocab_size=vocab_size, bos_token_id=eod_id,
                                eos_token_id=eod_id, **kwargs)


def _rope_from_hf(config: Dict[str, Any], family: Family, model: Dict[str, Any]) -> None:
    """rope_parameters (transformers 5) or rope_theta + rope_scaling (before it) -> model.*; an unsupported
    rope_type or parameter is refused naming it."""
    nested = config.get("rope_parameters")
    where = "rope_parameters" if nested else "rope_scaling"
    params = dict(nested or config.get("rope_scaling") or {})
    theta = params.pop("rope_theta", config.get("rope_theta"))
    if theta is not None:
        model["rope_theta"] = float(theta)
    hf_type = params.pop("rope_type", params.pop("type", "default"))
    ours = next((k for k, v in HF_ROPE_TYPE.items() if v == hf_type), None)
    if ours is None or (ours != "none" and "rope_scaling" not in family.features):
        supported = [HF_ROPE_TYPE[k] for k in (family.features.get("rope_scaling") or ("none",))]
        raise ConversionError(f"config.json {where}.rope_type: '{hf_type}' is not supported by the {family.name} "
                              f"family (supported: {', '.join(supported)})")
    model["rope_scaling"] = ours
    wanted = {ROPE_FIELDS[k]: k for k in ROPE_KEYS[ours]}
    for name, value in params.items():
        if name not in wanted:
            raise ConversionError(f"config.json {where}.{name}: not a parameter of rope_type '{hf_type}' that the "
                                  f"{family.name} family converts")
        model[wanted[name]] = value
    missing = sorted(set(wanted) - set(params))
    if missing:
        raise ConversionError(f"config.json {where}: rope_type '{hf_type}' needs {', '.join(missing)}")


def model_from_hf(config: Dict[str, Any], family: Family) -> Dict[str, Any]:
    """Our complete model.* settings from an HF config.json (the inverse of model_config). Every field is
    mapped, fixed (and holds an allowed value) or ignored with a reason; any other is refused, named."""
    model = asdict(ModelConfig(hidden_size=0, num_layers=0, num_attention_heads=0))
    mapped = {hf: ours for ours, hf in family.hf_fields.items()}
    rope = ("rope_parameters", "rope_scaling", "rope_theta") if family.rope else ()
    for name, value in config.items():
        if name in mapped:
            if value is not None:
                model[mapped[name]] = value
        elif name in family.hf_fixed:
            allowed = family.hf_fixed[name]
            if not (allowed(value) if callable(allowed) else value in allowed):
                shown = allowed.__name__ if callable(allowed) else ", ".join(repr(a) for a in allowed)
                raise ConversionError(f"config.json {name}: {value!r} is not supported by the {family.name} family "
                                      f"(supported: {shown})")
        elif name not in family.hf_ignored and name != "vocab_size" and name not in rope:
            raise ConversionError(f"config.json {name}: a field the {family.name} family does not convert (neither "
                                  f"mapped nor on its ignore list); nothing was written")
    if family.rope:
        _rope_from_hf(config, family, model)
    model["family"], model["vocab_size"] = family.name, config["vocab_size"]
    model["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", family.name == "gpt2"))
    if model.get("head_dim") == model["hidden_size"] // max(model["num_attention_heads"], 1):
        model["head_dim"] = None  # the derived size: as a model written before head_dim existed
    if "qk_norm" in family.features:
        model["qk_norm"] = family.features["qk_norm"][0]
    return model


def padded_vocab_size(vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron pads the embedding to a multiple of make_vocab_size_divisible_by x TP."""
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


def ffn_size(model: Dict[str, Any]) -> int:
    return model["ffn_hidden_size"] or 4 * model["hidden_size"]


def parameter_count(model: Any, vocab: int) -> int:
    return by_name(model["family"]).parameters(model, vocab)


