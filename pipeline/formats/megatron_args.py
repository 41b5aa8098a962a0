"""Megatron-LM's checkpoint `args` <-> this pipeline's model.* settings and vocabulary sizes.

Megatron-LM stores its whole command line in every checkpoint, as an `argparse.Namespace` of its own
argument names (`--num-query-groups` -> `num_query_groups`); `--use-checkpoint-args`,
`check_checkpoint_args` and tools/checkpoint/ read it back. This pipeline used to store a plain dict
(`{"model": {...model.* keys}, "vocab_size", "padded_vocab_size", ...}`, "our args" below).

Reading (`our_args`): our dict as it is; a Namespace this pipeline wrote, by the dict it carries
(`PIPELINE_ARGS`); any other Namespace through the tables below: MODEL_ARGS (one Megatron-LM arg per
model.* key), FAMILY_ARGS (which family a combination of normalization, gated MLP, biases and
positions is) and REFUSED (what no family holds: refused naming the arg). Writing (`namespace`): the
same tables the other way, plus the layout and precision args Megatron-LM's loaders compare, and our
dict under PIPELINE_ARGS (Megatron-LM ignores an arg it does not know).
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from pipeline.errors import ConversionError

PIPELINE_ARGS = "pipeline_args"  # the attribute of a Namespace holding our own dict, when we wrote it
CHECKPOINT_VERSION = 3.0  # Megatron-LM's current: layouts compared by tensor/pipeline_model_parallel_size
TRANSFORMER_IMPLS = ("transformer_engine", "local")

# (Megatron-LM arg, older name it had, model.* key, its type): the value is the same on both sides
MODEL_ARGS: Tuple[Tuple[str, Optional[str], str, Callable], ...] = (
    ("num_layers", None, "num_layers", int),
    ("hidden_size", None, "hidden_size", int),
    ("ffn_hidden_size", None, "ffn_hidden_size", int),
    ("num_attention_heads", None, "num_attention_heads", int),
    ("max_position_embeddings", None, "max_position_embeddings", int),
    ("rotary_base", None, "rope_theta", float),
    ("norm_epsilon", "layernorm_epsilon", "norm_eps", float),
)
# model.* keys from args that need more than a copy, and what decides them:
#   num_key_value_heads   num_query_groups when group_query_attention, else None (= heads)
#   head_dim              kv_channels, None when it is hidden_size / num_attention_heads
#   tie_word_embeddings   not untie_embeddings_and_output_weights
#   rope_scaling(_factor) use_rope_scaling (Llama 3.1's, factor rope_scaling_factor) -> "llama3"
#   family                FAMILY_ARGS

# Megatron-LM's defaults, for args an older checkpoint does not hold
DEFAULTS = {"normalization": "LayerNorm", "swiglu": False, "add_bias_linear": True, "add_qkv_bias": False,
            "untie_embeddings_and_output_weights": False, "group_query_attention": False, "rotary_base": 10000,
            "norm_epsilon": 1e-5, "openai_gelu": False, "qk_layernorm": False, "use_rope_scaling": False,
            "rope_scaling_factor": 8.0}

# family -> the args that make it (None: either value); the first match wins
FAMILY_ARGS: Dict[str, Dict[str, Any]] = {
    "llama": dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope", add_bias_linear=False,
                  add_qkv_bias=False, qk_layernorm=False),
    "qwen2": dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope", add_bias_linear=False,
                  add_qkv_bias=True, qk_layernorm=False),
    "qwen3": dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope", add_bias_linear=False,
                  add_qkv_bias=False, qk_layernorm=True),
    # q/k/v carry a bias with add_bias_linear whatever add_qkv_bias says
    "gpt2": dict(normalization="LayerNorm", swiglu=False, position_embedding_type="learned_absolute",
                 add_bias_linear=True, add_qkv_bias=None, qk_layernorm=False),
}
# what we write for each family's add_qkv_bias where FAMILY_ARGS allows either (megatron-core's spelling)
WRITE_QKV_BIAS = {"gpt2": True}


def _set(value) -> bool:
    return value not in (None, False, 0, "", [], ())


# arg -> (is the checkpoint refused for this value, why): what no family here holds
REFUSED: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "num_experts": (_set, "a mixture of experts"),
    "num_moe_experts": (_set, "a mixture of experts"),
    "moe_layer_freq": (lambda v: v not in (None, 1), "a mixture of experts"),
    "multi_latent_attention": (_set, "multi-latent attention (DeepSeek)"),
    "apply_layernorm_1p": (_set, "zero-centred (1 + weight) layer norms"),
    "rotary_percent": (lambda v: v not in (None, 1.0), "RoPE on part of each head"),
    "rotary_interleaved": (_set, "interleaved RoPE"),
    "squared_relu": (_set, "a squared-ReLU MLP"),
    "hybrid_override_pattern": (_set, "a hybrid (Mamba) model"),
    "is_hybrid_model": (_set, "a hybrid (Mamba) model"),
    "heterogeneous_layers_config_path": (_set, "heterogeneous layers"),
    "experimental_attention_variant": (_set, "an experimental attention variant"),
    "spec": (_set, "a custom layer spec"),
    "mtp_num_layers": (_set, "multi-token-prediction layers"),
    "decoder_first_pipeline_num_layers": (_set, "an uneven pipeline split"),
    "decoder_last_pipeline_num_layers": (_set, "an uneven pipeline split"),
    "account_for_embedding_in_pipeline_split": (_set, "an uneven pipeline split"),
    "account_for_loss_in_pipeline_split": (_set, "an uneven pipeline split"),
}
POSITION_TYPES = ("rope", "learned_absolute")


def _get(ns: argparse.Namespace, name: str, old: Optional[str] = None) -> Any:
    for attr in (name, old):
        if attr and getattr(ns, attr, None) is not None:
            return getattr(ns, attr)
    return DEFAULTS.get(name)


def _position_type(ns: argparse.Namespace) -> str:
    found = getattr(ns, "position_embedding_type", None)
    if found is None:  # before the arg existed
        if getattr(ns, "use_rotary_position_embeddings", False):
            return "rope"
        return "learned_absolute" if getattr(ns, "add_position_embedding", True) else "none"
    return found


def family_of(ns: argparse.Namespace) -> str:
    """The family whose FAMILY_ARGS the checkpoint's args hold; refused naming each arg otherwise."""
    if getattr(ns, "disable_bias_linear", None) is not None and getattr(ns, "add_bias_linear", None) is None:
        ns.add_bias_linear = not ns.disable_bias_linear  # the flag's older spelling
    held = {"position_embedding_type": _position_type(ns),
            **{k: _get(ns, k) for k in ("normalization", "swiglu", "add_bias_linear", "add_qkv_bias", "qk_layernorm")}}
    if held["position_embedding_type"] not in POSITION_TYPES:
        raise ConversionError(f"position_embedding_type={held['position_embedding_type']!r}: no model family here "
                              f"has it (supported: {', '.join(POSITION_TYPES)})")
    for name, want in FAMILY_ARGS.items():
        if all(v is None or held[k] == v for k, v in want.items()):
            return name
    shown = ", ".join(f"{k}={v!r}" for k, v in held.items())
    known = "; ".join(f"{n}: " + ", ".join(f"{k}={v!r}" for k, v in w.items() if v is not None)
                      for n, w in FAMILY_ARGS.items())
    raise ConversionError(f"Megatron-LM args {shown}: no model family here has this combination ({known})")


def refusals(ns: argparse.Namespace) -> None:
    for name, (refuse, what) in REFUSED.items():
        value = getattr(ns, name, None)
        if refuse(value):
            raise ConversionError(f"{name}={value!r}: the checkpoint is {what}, which no model family here holds; "
                                  f"nothing was converted")


def model_from_namespace(ns: argparse.Namespace) -> Dict[str, Any]:
    """Our args dict from Megatron-LM's args. vocab_size is the padded size: the true one is not stored
    (pipeline convert's tokenizer= or vocab_size= gives it)."""
    refusals(ns)
    family = family_of(ns)
    model: Dict[str, Any] = {"family": family}
    for arg, old, ours, kind in MODEL_ARGS:
        value = _get(ns, arg, old)
        if value is None and arg in ("num_layers", "hidden_size", "num_attention_heads"):
            raise ConversionError(f"{arg}: not in the checkpoint's args; not a Megatron-LM GPT checkpoint")
        model[ours] = kind(value) if value is not None else None
    heads = model["num_attention_heads"]
    if model["ffn_hidden_size"] is None:  # Megatron-LM's default
        model["ffn_hidden_size"] = 4 * model["hidden_size"]
    if model["max_position_embeddings"] is None:
        model["max_position_embeddings"] = int(getattr(ns, "seq_length", None) or 4096)
    if model["rope_theta"] is None:
        model["rope_theta"] = 10000.0
    groups = getattr(ns, "num_query_groups", None) if _get(ns, "group_query_attention") else None
    model["num_key_value_heads"] = int(groups) if groups and groups != heads else None
    kv = getattr(ns, "kv_channels", None)
    model["head_dim"] = int(kv) if kv and kv * heads != model["hidden_size"] else None
    model["tie_word_embeddings"] = not _get(ns, "untie_embeddings_and_output_weights")
    model["qk_norm"] = family == "qwen3"
    model["rope_scaling"], model["rope_scaling_factor"] = "none", 1.0
    if _get(ns, "use_rope_scaling"):
        model["rope_scaling"], model["rope_scaling_factor"] = "llama3", float(_get(ns, "rope_scaling_factor"))
        # megatron-core's apply_llama3_scaling: these are fixed there
        model.update(rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_position_embeddings=8192)
    padded = getattr(ns, "padded_vocab_size", None)
    if not padded:
        raise ConversionError("padded_vocab_size: not in the checkpoint's args; the embedding size is unknown")
    hf_config = {}
    if family == "gpt2" and not _get(ns, "openai_gelu"):
        hf_config["activation_function"] = "gelu"  # Megatron-LM's default GELU is the exact (erf) one
    return {"model": model, "vocab_size": int(padded), "padded_vocab_size": int(padded),
            "make_vocab_size_divisible_by": getattr(ns, "make_vocab_size_divisible_by", None), "eod_id": None,
            "tokenizer_dir": None, "hf_config": hf_config, "vocab_known": False,
            "layout": {"tp": getattr(ns, "tensor_model_parallel_size", None),
                       "pp": getattr(ns, "pipeline_model_parallel_size", None),
                       "vpp": getattr(ns, "virtual_pipeline_model_parallel_size", None)}}


def our_args(stored: Any, where: str) -> Dict[str, Any]:
    """Our args dict from a checkpoint's `args`: ours (a dict, or carried in a Namespace we wrote) or
    Megatron-LM's Namespace."""
    if isinstance(stored, argparse.Namespace):
        carried = getattr(stored, PIPELINE_ARGS, None)
        if isinstance(carried, dict) and isinstance(carried.get("model"), dict):
            return carried
        try:
            return model_from_namespace(stored)
        except ConversionError as e:
            raise ConversionError(f"{where}: {e}") from None
    if isinstance(stored, dict) and isinstance(stored.get("model"), dict):
        return stored
    raise ConversionError(f"{where}: no model args stored (neither Megatron-LM's argparse.Namespace nor this "
                          f"pipeline's dict)")


DTYPE_FLAGS = {torch.bfloat16: dict(bf16=True, fp16=False), torch.float16: dict(bf16=False, fp16=True),
               torch.float32: dict(bf16=False, fp16=False)}


def namespace(args: Dict[str, Any], tp: int, pp: int, vpp: Optional[int] = None,
              transformer_impl: str = "transformer_engine", dtype: torch.dtype = torch.float32,
              iteration: int = 1, ckpt_format: str = "torch") -> argparse.Namespace:
    """Megatron-LM's args for a checkpoint of this model at this layout: what `check_checkpoint_args`
    compares, what `load_args_from_checkpoint` (--use-checkpoint-args) sets and what
    tools/checkpoint/loader_core.py reads; our dict rides along under PIPELINE_ARGS."""
    model = args["model"]
    family = model["family"]
    if family not in FAMILY_ARGS:
        raise ConversionError(f"family {family}: no Megatron-LM args for it")
    fam = {k: (WRITE_QKV_BIAS.get(family, False) if v is None else v) for k, v in FAMILY_ARGS[family].items()}
    heads, hidden = model["num_attention_heads"], model["hidden_size"]
    groups = model.get("num_key_value_heads") or heads
    values: Dict[str, Any] = {arg: model.get(ours) for arg, _, ours, _ in MODEL_ARGS}
    values["ffn_hidden_size"] = model.get("ffn_hidden_size") or 4 * hidden
    values["rotary_base"] = int(model.get("rope_theta") or 10000)  # Megatron-LM's arg is an int
    scaling = model.get("rope_scaling", "none")
    if scaling not in ("none", "llama3"):
        raise ConversionError(f"rope_scaling={scaling!r}: Megatron-LM has no arg for it")
    values.update(
        fam, num_query_groups=groups, group_query_attention=groups != heads,
        kv_channels=model.get("head_dim") or hidden // heads, layernorm_epsilon=model.get("norm_eps"),
        untie_embeddings_and_output_weights=not model["tie_word_embeddings"],
        add_position_embedding=fam["position_embedding_type"] == "learned_absolute",
        use_rotary_position_embeddings=fam["position_embedding_type"] == "rope",
        rotary_percent=1.0, rotary_interleaved=False, rotary_seq_len_interpolation_factor=None,
        use_rope_scaling=scaling == "llama3", rope_scaling_factor=model.get("rope_scaling_factor") or 8.0,
        openai_gelu=family == "gpt2", squared_relu=False, apply_layernorm_1p=False,
        apply_query_key_layer_scaling=False, attention_softmax_in_fp32=True, bias_gelu_fusion=False,
        attention_dropout=0.0, hidden_dropout=0.0, num_experts=None, multi_latent_attention=False,
        seq_length=model["max_position_embeddings"], padded_vocab_size=args["padded_vocab_size"],
        make_vocab_size_divisible_by=args.get("make_vocab_size_divisible_by") or 128,
        vocab_size=args.get("vocab_size"), vocab_file=None, merge_file=None,
        tokenizer_type="HuggingFaceTokenizer", tokenizer_model=args.get("tokenizer_dir"),
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
        num_layers_per_virtual_pipeline_stage=model["num_layers"] // (pp * vpp) if vpp else None,
        expert_model_parallel_size=1, context_parallel_size=1, sequence_parallel=False,
        transformer_impl=transformer_impl, use_legacy_models=False, use_mcore_models=True,
        params_dtype=dtype, **DTYPE_FLAGS[dtype], data_parallel_random_init=False,
        iteration=iteration, consumed_train_samples=0, consumed_valid_samples=0,
        ckpt_format=ckpt_format, use_dist_ckpt=ckpt_format != "torch", bert_binary_head=False,
        disable_bias_linear=not fam["add_bias_linear"],
    )
    values[PIPELINE_ARGS] = args
    return argparse.Namespace(**values)
