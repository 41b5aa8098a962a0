"""train.hf_args and train.megatron_args: trainer settings the pipeline has no key of its own for, given by
name, and train.attention's machine needs. Checked by the train stage before any stage runs (`check`): an
unknown name is an error naming the nearest field, and a name the pipeline sets from one of its own keys
is refused, naming that key. The backends apply them last (`with_hf_args`, `fields_of`), so an entry
replaces the pipeline's value for a setting it does not own (a dropout, a fused kernel, the scheduler).
Which entries are how-only: HF_HOW_ARGS and MEGATRON_HOW_ARGS in pipeline/config.py.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
from typing import Any, Dict, Iterable, Mapping

from pipeline.config import recompute_of, value_of
from pipeline.errors import ConfigError

_PRECISION = "train.precision"
_CHECKPOINTING = "train.eval_every / train.save_every / train.keep_checkpoints"

# TrainingArguments that hf_backend.training_arguments sets from the pipeline's keys
HF_OWNED = {
    "output_dir": "run_dir", "run_name": "name",
    "per_device_train_batch_size": "train.micro_batch_size", "per_device_eval_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_tokens", "num_train_epochs": "train.epochs",
    "max_steps": "train.max_steps", "learning_rate": "train.lr", "warmup_steps": "train.warmup_ratio",
    "weight_decay": "train.weight_decay", "max_grad_norm": "train.grad_clip",
    "adam_beta1": "train.adam_beta1", "adam_beta2": "train.adam_beta2", "adam_epsilon": "train.adam_eps",
    "eval_strategy": "train.eval_every", "eval_steps": "train.eval_every", "save_strategy": "train.save_every",
    "save_steps": "train.save_every", "save_total_limit": "train.keep_checkpoints",
    "load_best_model_at_end": _CHECKPOINTING, "metric_for_best_model": _CHECKPOINTING,
    "greater_is_better": _CHECKPOINTING, "logging_steps": "train.logging_steps", "report_to": "train.tracker",
    "seed": "train.seed", "data_seed": "train.seed", "bf16": _PRECISION, "fp16": _PRECISION,
    "use_cpu": "the machine (a GPU when there is one)", "deepspeed": "train.zero_stage / train.offload",
    **dict.fromkeys(("activation_checkpointing", "activation_checkpointing_kwargs", "gradient_checkpointing",
                     "gradient_checkpointing_kwargs"), "train.recompute"),
    "resume_from_checkpoint": "train.resume_from",
}
# an hf_args entry that replaces a pipeline setting drops the pipeline's settings tied to it
HF_TIED = {"lr_scheduler_type": ("lr_scheduler_kwargs",)}

_MODEL = "model.* (and model.family)"
_LAYOUT = "train.parallel.vpp (the P2P mode follows the schedule)"
# TransformerConfig / OptimizerConfig / DistributedDataParallelConfig fields the megatron backend sets
# from the pipeline's keys (mcore/model.py transformer_config and build_model, mcore/step.py build_optimizer)
MEGATRON_OWNED = {
    **dict.fromkeys(("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                     "qk_layernorm", "ffn_hidden_size", "normalization", "layernorm_epsilon", "gated_linear_unit",
                     "activation_func", "add_bias_linear", "add_qkv_bias"), _MODEL),
    "tensor_model_parallel_size": "train.parallel.tp", "pipeline_model_parallel_size": "train.parallel.pp",
    "virtual_pipeline_model_parallel_size": "train.parallel.vpp",
    "sequence_parallel": "train.parallel.sequence_parallel", "overlap_p2p_comm": _LAYOUT, "batch_p2p_comm": _LAYOUT,
    "use_distributed_optimizer": "train.parallel.distributed_optimizer",
    **dict.fromkeys(("params_dtype", "pipeline_dtype", "bf16", "fp16"), _PRECISION),
    "recompute_granularity": "train.recompute", "attention_backend": "train.attention",
    "lr": "train.lr", "min_lr": "train.min_lr_ratio", "weight_decay": "train.weight_decay",
    "adam_beta1": "train.adam_beta1", "adam_beta2": "train.adam_beta2", "adam_eps": "train.adam_eps",
    "clip_grad": "train.grad_clip",
}
# megatron_args entries that only mean something with full recompute
NEEDS_FULL_RECOMPUTE = ("recompute_method", "recompute_num_layers")


def with_hf_args(kwargs: Mapping[str, Any], hf_args: Mapping[str, Any]) -> Dict[str, Any]:
    """The pipeline's TrainingArguments, then train.hf_args over them."""
    tied = {name for key in hf_args for name in HF_TIED.get(key, ())}
    return {**{k: v for k, v in kwargs.items() if k not in tied}, **hf_args}


def field_names(schema: type) -> set:
    return {f.name for f in dataclasses.fields(schema)}


def fields_of(schema: type, args: Mapping[str, Any]) -> Dict[str, Any]:
    """The train.megatron_args entries that are fields of `schema` (a name in two configs goes to both)."""
    names = field_names(schema)
    return {k: v for k, v in args.items() if k in names}


def megatron_schemas() -> Dict[str, type]:
    """The megatron-core configs megatron_args may set, by name (imported here: megatron-core is slow to import)."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer import TransformerConfig

    return {"TransformerConfig": TransformerConfig, "OptimizerConfig": OptimizerConfig,
            "DistributedDataParallelConfig": DistributedDataParallelConfig}


def hf_schemas() -> Dict[str, type]:
    from transformers import TrainingArguments

    return {"TrainingArguments": TrainingArguments}


def check_names(key: str, names: Iterable[str], schemas: Mapping[str, type], owned: Mapping[str, str]) -> None:
    """Each name a field of one of `schemas`, and not one the pipeline sets (`owned`: name -> its key)."""
    known = set().union(*(field_names(s) for s in schemas.values()))
    for name in names:
        if name in owned:
            raise ConfigError(f"{key}.{name}: set by the pipeline from {owned[name]}; use that instead")
        if name not in known:
            near = difflib.get_close_matches(name, sorted(known), n=1)
            raise ConfigError(f"{key}.{name}: not a field of {' / '.join(schemas)}, so nothing would read it"
                              f"{f'; did you mean {key}.{near[0]}?' if near else ''}")


def check_attention(train) -> None:
    """flash only where its kernels can run, and on hf with document masking only in one-row batches
    (transformers' flash_attention_2 finds packed documents from the position ids of a batch of one only,
    and otherwise attends across them); eager on megatron under Transformer Engine only without document
    masking (TE's unfused attention takes no packed THD rows, which document masking hands TE)."""
    attention, backend = value_of(train.attention), train.backend
    te = importlib.util.find_spec("transformer_engine") is not None
    if attention == "flash" and backend == "hf" and train.document_mask and train.micro_batch_size > 1:
        raise ConfigError(f"train.attention: flash_attention_2 keeps documents apart (train.document_mask) only "
                          f"in a micro batch of one sequence, not {train.micro_batch_size}; set "
                          f"train.micro_batch_size=1, train.document_mask=false, or use sdpa")
    if attention == "flash":
        import torch

        needs = {"hf": ("flash_attn",), "megatron": ("transformer_engine", "flash_attn")}[backend]
        missing = [m for m in needs if importlib.util.find_spec(m) is None]
        if missing or not torch.cuda.is_available():
            what = f"{', '.join(missing)} is not installed" if missing else "there is no GPU"
            raise ConfigError(f"train.attention: flash needs a GPU and {' and '.join(needs)} ({what}); "
                              f"use sdpa (the default) or eager")
        if train.precision == "fp32":
            raise ConfigError("train.attention: flash attention runs in bf16/fp16 only; set train.precision to "
                              "auto or bf16, or use sdpa")
    if attention == "eager" and backend == "megatron" and te and train.document_mask:
        raise ConfigError("train.attention: eager on megatron is Transformer Engine's unfused attention, which "
                          "takes no packed (THD) rows, and train.document_mask needs them under TE; use sdpa, "
                          "or set train.document_mask=false")


def check(train) -> None:
    """train.hf_args / train.megatron_args names, and train.attention on this machine."""
    check_attention(train)
    if train.backend == "hf" and train.hf_args:
        check_names("train.hf_args", train.hf_args, hf_schemas(), HF_OWNED)
    if train.backend == "megatron" and train.megatron_args:
        check_names("train.megatron_args", train.megatron_args, megatron_schemas(), MEGATRON_OWNED)
        early = [n for n in NEEDS_FULL_RECOMPUTE if n in train.megatron_args]
        if early and recompute_of(train) != "full":
            raise ConfigError(f"train.megatron_args.{early[0]}: only full recompute reads it; set "
                              f"train.recompute=full, or drop it")
