"""Megatron checkpoints on disk, both formats, as streams of global tensors named as megatron-core
names them (`decoder.layers.3.self_attention.linear_qkv.weight`).

torch_dist (megatron-core dist_checkpointing): every tensor stored whole, layers stacked on a leading
axis, so it loads at any TP/PP. Legacy `torch` (Megatron-LM's original layout):
    iter_0000000/mp_rank_TT/model_optim_rng.pt           (pp = 1)
    iter_0000000/mp_rank_TT_PPP/model_optim_rng.pt       (pp > 1)
each file holding {"model": that rank's shard, local layer numbers}, "args", "iteration",
"checkpoint_version"}. How a tensor splits across TP follows one rule per kind (TP_RULES): column
(dim 0), row (dim 1), replicated; a gated MLP's fc1 splits gate and up separately, so each rank
holds [gate_r; up_r]. Layers split evenly across PP, renumbered from 0 on every stage; the first
stage holds the embeddings, the last the final norm and the output layer.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from pipeline.convert.mapping import ConversionError, GatedMLP, Mapping
from pipeline.train.megatron_entry import TRACKER, iteration_dir, latest_iteration

LEGACY_FILE = "model_optim_rng.pt"
# TP split kind by megatron name suffix; anything else (norms, row-parallel biases, positions) is replicated
TP_RULES = (
    ("self_attention.linear_qkv.weight", "column"), ("self_attention.linear_qkv.bias", "column"),
    ("mlp.linear_fc1.weight", "column"), ("mlp.linear_fc1.bias", "column"),
    ("self_attention.linear_proj.weight", "row"), ("mlp.linear_fc2.weight", "row"),
    ("embedding.word_embeddings.weight", "column"), ("output_layer.weight", "column"),
)
RANK_DIR = re.compile(r"mp_rank_(\d+)(?:_(\d+))?$")


def tp_kind(mapping: Mapping, name: str) -> str:
    kind = next((k for suffix, k in TP_RULES if name.endswith(suffix)), "replicated")
    return "gated" if kind == "column" and isinstance(mapping, GatedMLP) else kind


def split_tp(tensor: torch.Tensor, kind: str, tp: int) -> List[torch.Tensor]:
    if kind == "replicated" or tp == 1:
        return [tensor] * tp
    if kind == "gated":
        return [torch.cat(pair) for pair in zip(*(half.chunk(tp) for half in tensor.chunk(2)))]
    return list(tensor.chunk(tp, dim=0 if kind == "column" else 1))


def merge_tp(shards: List[torch.Tensor], kind: str) -> torch.Tensor:
    if kind == "replicated" or len(shards) == 1:
        return shards[0]
    if kind == "gated":
        halves = [s.chunk(2) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    return torch.cat(shards, dim=0 if kind == "column" else 1)


def layer_of(name: str) -> Tuple[Optional[int], str]:
    """`decoder.layers.3.x` -> (3, `x`); other names -> (None, name)."""
    m = re.match(r"decoder\.layers\.(\d+)\.(.+)$", name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def stage_of(name: str, layers_per_stage: int, pp: int) -> Tuple[int, str]:
    """The pipeline stage holding a global name, and its name there (local layer number)."""
    layer, rest = layer_of(name)
    if layer is not None:
        return layer // layers_per_stage, f"decoder.layers.{layer % layers_per_stage}.{rest}"
    first = name.startswith("embedding.")
    return (0 if first else pp - 1), name


def checkpoint_path(src: Path) -> Path:
    latest = latest_iteration(src)
    if latest is None:
        raise ConversionError(f"{src}: no {TRACKER}; expected a Megatron checkpoint dir (iter_XXXXXXX/ + tracker)")
    return iteration_dir(src, latest)


def legacy_ranks(path: Path) -> Dict[Tuple[int, int], Path]:
    """(tp rank, pp rank) -> file, for a legacy iteration dir; {} for torch_dist."""
    ranks = {}
    for d in path.iterdir():
        m = RANK_DIR.match(d.name)
        if m and (d / LEGACY_FILE).is_file():
            ranks[(int(m.group(1)), int(m.group(2) or 0))] = d / LEGACY_FILE
    return ranks


def load_legacy(file: Path) -> Dict[str, Any]:
    """weights_only: plain tensors and containers only; Megatron-LM's own files also store their args as
    an argparse.Namespace, the one class allowed besides."""
    import argparse

    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)


def read_args(src: Path) -> Tuple[Path, Dict[str, Any]]:
    path = checkpoint_path(src)
    ranks = legacy_ranks(path)
    if ranks:
        args = load_legacy(ranks[min(ranks)]).get("args")
    else:
        from megatron.core import dist_checkpointing

        args = dist_checkpointing.load_common_state_dict(str(path)).get("args")
    if not isinstance(args, dict) or "model" not in args:
        raise ConversionError(f"{path}: no model args stored; only checkpoints of this pipeline's megatron backend "
                              f"or `pipeline convert` are read")
    return path, args


# ----------------------------------------------------------------------------- reading

def read_tensors(path: Path, args: Dict[str, Any], names: List[Tuple[Mapping, str]]) -> Iterator[Tuple[str, torch.Tensor]]:
    """(global name, global tensor) for every requested name, from either format."""
    ranks = legacy_ranks(path)
    yield from (_read_legacy(path, ranks, args, names) if ranks else _read_torch_dist(path, names))


def _read_torch_dist(path: Path, names):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    stored = dist_checkpointing.load_tensors_metadata(str(path))
    by_key: Dict[str, list] = {}
    for _, name in names:
        layer, rest = layer_of(name)
        by_key.setdefault(f"decoder.layers.{rest}" if layer is not None else name, []).append((name, layer))
    missing = sorted(set(by_key) - set(stored))
    if missing:
        raise ConversionError(f"{path}: missing tensors {missing}")
    # one stored key at a time, all its layers at once: megatron-core's loader cannot read part of the
    # stacked layer axis in one process
    for key, wanted in by_key.items():
        meta = stored[key]
        empty = torch.empty(tuple(meta.global_shape), dtype=meta.dtype)
        whole = dist_checkpointing.load({"t": ShardedTensor.from_rank_offsets(key, empty, replica_id=0)}, str(path))["t"]
        for name, layer in wanted:
            yield name, whole[layer] if layer is not None else whole


def _read_legacy(path: Path, ranks, args, names):
    tp, pp = 1 + max(t for t, _ in ranks), 1 + max(p for _, p in ranks)
    if len(ranks) != tp * pp:
        raise ConversionError(f"{path}: {len(ranks)} rank files for a {tp} x {pp} TP x PP layout; some are missing")
    layers_per_stage = args["model"]["num_layers"] // pp
    for stage in range(pp):  # one pipeline stage's TP files in memory (mmap) at a time
        shards = [load_legacy(ranks[(t, stage)])["model"] for t in range(tp)]
        for mapping, name in names:
            where, local = stage_of(name, layers_per_stage, pp)
            if where != stage:
                continue
            if local not in shards[0]:
                raise ConversionError(f"{ranks[(0, stage)]}: missing tensor {local} (global {name})")
            yield name, merge_tp([s[local] for s in shards], tp_kind(mapping, name))


# ----------------------------------------------------------------------------- writing

def write_torch_dist(dst: Path, args: Dict[str, Any], tensors: Iterator[Tuple[Mapping, str, torch.Tensor]]) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    num_layers, state = args["model"]["num_layers"], {}
    for _, name, tensor in tensors:
        layer, rest = layer_of(name)
        if layer is None:
            state[name] = ShardedTensor.from_rank_offsets(name, tensor, replica_id=0)
        else:
            state[name] = ShardedTensor.from_rank_offsets(f"decoder.layers.{rest}", tensor, (0, layer, num_layers),
                                                          replica_id=0, prepend_axis_num=1)
    iteration_dir(dst, 0).mkdir()
    dist_checkpointing.save({"model": state, "iteration": 0, "args": args}, str(iteration_dir(dst, 0)))
    (dst / TRACKER).write_text("0")


def write_legacy_stage(dst: Path, args: Dict[str, Any], tensors: Iterator[Tuple[Mapping, str, torch.Tensor]], tp: int,
                       pp: int, stage: int) -> None:
    """One pipeline stage's rank files, from that stage's global tensors."""
    per_stage = args["model"]["num_layers"] // pp
    ranks: List[Dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    tied = args["model"]["tie_word_embeddings"]
    for mapping, name, tensor in tensors:
        where, local = stage_of(name, per_stage, pp)
        assert where == stage, (name, where, stage)
        for t, shard in enumerate(split_tp(tensor, tp_kind(mapping, name), tp)):
            ranks[t][local] = shard.clone()
    if tied and pp > 1 and stage == pp - 1:  # megatron-core keeps the tied output weight on the last stage too
        first = [load_legacy(iteration_dir(dst, 0) / rank_dir(t, 0, pp) / LEGACY_FILE)["model"] for t in range(tp)]
        for t in range(tp):
            ranks[t]["output_layer.weight"] = first[t]["embedding.word_embeddings.weight"].clone()
    for t, model in enumerate(ranks):
        folder = iteration_dir(dst, 0) / rank_dir(t, stage, pp)
        folder.mkdir(parents=True)
        torch.save({"model": model, "args": args, "iteration": 0, "checkpoint_version": 3.0}, folder / LEGACY_FILE)


def rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
