"""The model families, by HF architecture and by our model.family. Everything about a family is its
module's FAMILY table (pipeline/models/mapping.py's Family); adding one: that module, one entry in
FAMILY_MODULES, a tiny config in configs/model/ and its round-trip and logits tests."""
from typing import Any, Mapping

from pipeline.config import ADDED_DEFAULTS
from pipeline.errors import ConfigError, ConversionError
from pipeline.models import gpt2, llama, qwen2, qwen3
from pipeline.models.mapping import Family

FAMILIES = {f.name: f for f in (llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY, gpt2.FAMILY)}
BY_ARCHITECTURE = {arch: f for f in FAMILIES.values() for arch in f.architectures}
MODEL_FEATURES = {key[len("model."):]: default for key, default in ADDED_DEFAULTS.items() if key.startswith("model.")}


def by_architecture(architecture: str) -> Family:
    if architecture not in BY_ARCHITECTURE:
        raise ConversionError(f"architecture {architecture} is not supported; supported: {sorted(BY_ARCHITECTURE)}")
    return BY_ARCHITECTURE[architecture]


def by_name(family: str) -> Family:
    """The family of model.family; a ConfigError naming the key and the families there are."""
    if family not in FAMILIES:
        raise ConfigError(f"model.family: '{family}' is not one of {', '.join(FAMILIES)}")
    return FAMILIES[family]


def feature_problem(model: Mapping[str, Any]):
    """The first model.* feature (the fields added to the schema as families came to need them) that its
    family does not support, as (key, message), or None."""
    family = by_name(model["family"])
    for key, default in MODEL_FEATURES.items():
        value = model.get(key, default)
        allowed = family.features[key] if key in family.features else (default,)
        if allowed is not None and value not in allowed:
            shown = ", ".join(str(a) for a in allowed)
            return f"model.{key}", f"{value} is not supported by the {family.name} family (allowed: {shown})"
    if model.get("rope_scaling", "none") == "llama3":
        orig = model.get("rope_original_max_position_embeddings")
        if not orig or orig >= model["max_position_embeddings"]:
            return ("model.rope_original_max_position_embeddings",
                    f"llama3 RoPE scaling needs the pretraining context, below max_position_embeddings "
                    f"{model['max_position_embeddings']}; got {orig}")
        if not model.get("rope_low_freq_factor", 1.0) < model.get("rope_high_freq_factor", 4.0):
            return "model.rope_low_freq_factor", "llama3 RoPE scaling needs low_freq_factor < high_freq_factor"
    if model.get("rope_scaling", "none") != "none" and not model.get("rope_scaling_factor", 1.0) > 0:
        return "model.rope_scaling_factor", f"must be > 0, got {model.get('rope_scaling_factor')}"
    if model.get("head_dim") is not None and model["head_dim"] <= 0:
        return "model.head_dim", f"must be > 0, got {model['head_dim']}"
    return None


def check_model(model: Mapping[str, Any]) -> None:
    """model.family is a family, and every model.* feature is one it supports (the train stage's check)."""
    problem = feature_problem(model)
    if problem:
        raise ConfigError(f"{problem[0]}: {problem[1]}")
