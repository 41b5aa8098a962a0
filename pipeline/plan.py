"""What a training run will do, before it runs (`pipeline run --dry-run`): world size, accumulation,
tokens per step, total steps, and an estimate of memory per GPU, with a warning when it does not fit.

The memory estimate, per GPU, in bytes per parameter held there, with mixed precision:
    weights 2 (bf16), gradients 2 (hf) or 4 (megatron's fp32 main grads), optimizer 12 (fp32 master
    copy + Adam's two moments).
ZeRO-1 shards the optimizer over data-parallel ranks, ZeRO-2 the gradients too, ZeRO-3 the weights
too. Megatron splits the model over tp x pp and, with the distributed optimizer, shards the
optimizer over data-parallel ranks. Activations follow Korthikanti et al. 2022 ("Reducing
Activation Recomputation in Large Transformer Models"), with flash attention (no s^2 term): 34·s·b·h
bytes per layer, or (10 + 24/tp)·s·b·h under tensor parallelism without sequence parallelism
(34/tp with it), 2·s·b·h with full recompute. The first pipeline stage holds pp micro batches in
flight under 1F1B. The logits add s·b·V·6 bytes (bf16 output and its fp32 loss). This ignores
fragmentation, communication buffers and the CUDA context, a few GB in practice.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Tuple

from omegaconf import DictConfig

from pipeline.config import data_parallel_size, grad_accumulation, recompute_of, run_dir_of, world_size
from pipeline.models import by_name

GIB = 1 << 30


def parameter_count(cfg: DictConfig) -> Tuple[int, int]:
    """(parameters, vocabulary) of model.*, by its family's count (pipeline/models/<family>.py); the
    vocabulary is model.vocab_size, else the BPE's size."""
    m = cfg.model
    vocab = m.vocab_size or cfg.tokenizer.vocab_size
    return by_name(m.family).parameters(m, vocab), vocab


def train_tokens(cfg: DictConfig) -> Tuple[Optional[int], str]:
    """Train-split tokens: measured by a finished mix stage, else planned from data.mix.total_tokens."""
    manifest = run_dir_of(cfg) / "mix" / "MANIFEST.json"
    if manifest.is_file():
        train = json.loads(manifest.read_text()).get("metrics", {}).get("train", {})
        if train.get("tokens"):
            return int(train["tokens"]), "the mix stage's output"
    mix = cfg.data.mix
    if mix.total_tokens:
        valid = mix.valid_tokens if mix.valid_tokens is not None else round(mix.total_tokens * mix.valid_fraction)
        return mix.total_tokens - valid, "data.mix.total_tokens"
    return None, ""


def memory_per_gpu(cfg: DictConfig, params: int, vocab: int) -> Tuple[float, float]:
    """(model states, activations) in bytes on the busiest GPU."""
    t, m = cfg.train, cfg.model
    dp = data_parallel_size(cfg)
    s, b, h = t.seq_len, t.micro_batch_size, m.hidden_size
    if t.backend == "megatron":
        par = t.parallel
        tp, pp = par.tp, par.pp
        states = params / (tp * pp) * (2 + 4 + (12 / dp if par.distributed_optimizer else 12))
        per_layer = {"full": 2.0}.get(recompute_of(t), 34 / tp if par.sequence_parallel else 10 + 24 / tp)
        # layers / pp per stage, times pp micro batches in flight on the first stage (1F1B)
        activations = m.num_layers * per_layer * s * b * h + s * b * vocab / tp * 6
        return states, activations
    z = t.zero_stage
    states = params * (2 / (dp if z >= 3 else 1) + 2 / (dp if z >= 2 else 1) + 12 / (dp if z >= 1 else 1))
    per_layer = 2.0 if recompute_of(t) == "full" else 34  # gradient checkpointing keeps each layer's input
    return states, m.num_layers * per_layer * s * b * h + s * b * vocab * 6


def training_plan(cfg: DictConfig) -> Tuple[List[str], List[str]]:
    """(lines, warnings) describing the training run this config makes."""
    t, launcher = cfg.train, cfg.launcher
    world, dp, accumulation = world_size(cfg), data_parallel_size(cfg), grad_accumulation(cfg)
    layout = (f"tp {t.parallel.tp} x pp {t.parallel.pp} x dp {dp}" if t.backend == "megatron"
              else f"ZeRO-{t.zero_stage} over dp {dp}")
    lines = [f"launcher   {launcher.name}: {launcher.nnodes} node(s) x {launcher.nproc_per_node} = world size {world}",
             f"backend    {t.backend}, {layout}",
             f"batch      {t.global_batch_tokens:,} tokens/step = micro {t.micro_batch_size} x seq {t.seq_len} x dp "
             f"{dp} x accumulation {accumulation}"]
    tokens, source = train_tokens(cfg)
    if t.max_steps:
        lines.append(f"steps      {t.max_steps} (train.max_steps)")
    elif tokens:
        steps = int(t.epochs * tokens // t.global_batch_tokens)
        lines.append(f"steps      {steps:,} = {t.epochs} epoch(s) x {tokens:,} "
                     f"train tokens ({source}) / tokens per step")
    else:
        lines.append("steps      known once the mix stage has run (epochs x its train tokens / tokens per step)")
    params, vocab = parameter_count(cfg)
    states, activations = memory_per_gpu(cfg, params, vocab)
    total = states + activations
    lines.append(f"memory     ~{total / GIB:.1f} GiB per GPU = {states / GIB:.1f} model states + "
                 f"{activations / GIB:.1f} activations ({params / 1e9:.2f}B parameters, vocab {vocab:,})")
    warnings = []
    if total > 0.9 * launcher.gpu_memory_gb * GIB:
        fixes = ("raise train.parallel.tp/pp, turn on train.recompute, or lower train.micro_batch_size"
                 if t.backend == "megatron" else
                 "raise train.zero_stage, set train.offload=true or train.recompute=full, or lower "
                 "train.micro_batch_size")
        warnings.append(f"the estimate ({total / GIB:.1f} GiB) exceeds 90% of launcher.gpu_memory_gb "
                        f"({launcher.gpu_memory_gb} GiB): {fixes}")
    if (t.init and not Path(t.init).exists()
            and not (t.backend == "hf" and "/" in t.init and not t.init.startswith("/"))):
        warnings.append(f"train.init: {t.init} does not exist on this machine")
    return lines, warnings
