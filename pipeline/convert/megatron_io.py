"""Megatron checkpoints on disk, both formats, as streams of global tensors named as megatron-core
names them (`decoder.layers.3.self_attention.linear_qkv.weight`).

torch_dist (megatron-core dist_checkpointing): every tensor stored whole, layers stacked on a leading
axis, so it loads at any TP/PP. Underneath it is torch.distributed.checkpoint (DCP): `.metadata`,
`__0_0.distcp`, plus megatron-core's `common.pt` (args, iteration) and `metadata.json`. It is read and
written here through DCP's own reader, writer and planner (the pickled `.metadata` and `common.pt` read
through pipeline/safeload.py's restricted loaders), one layer's tensor at a time and without
importing megatron-core: megatron-core's `dist_checkpointing.save` needs the whole state at once, and
its loader reads a stored key whole (every layer of it). megatron-core loads what this writes (the
tests load it into GPTModel at TP=2), and this reads what megatron-core training writes.

Legacy `torch` (Megatron-LM's original layout):
    iter_0000000/mp_rank_TT/model_optim_rng.pt           (pp = 1)
    iter_0000000/mp_rank_TT_PPP/model_optim_rng.pt       (pp > 1)
each file holding {"model": that rank's shard, local layer numbers}, "args", "iteration",
"checkpoint_version"}. How a tensor splits across TP follows one rule per kind (TP_RULES): column
(dim 0), row (dim 1), replicated; a gated MLP's fc1 splits gate and up separately, so each rank
holds [gate_r; up_r]. Layers split evenly across PP, renumbered from 0 on every stage; the first
stage holds the embeddings, the last the final norm and the output layer. A rank file is one
`torch.save`, so writing holds one rank's share of the model: 1/(tp x pp) of it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemReader, FileSystemWriter, save
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from pipeline.errors import ConversionError
from pipeline.formats.checkpoints import TRACKER, iteration_dir, latest_iteration
from pipeline.models.mapping import GatedMLP, Mapping
from pipeline.safeload import COMMON_FILE, load_dcp_metadata, safe_torch_load

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
    """Restricted to plain tensors and containers (pipeline/safeload.py)."""
    stored = safe_torch_load(file, mmap=True)
    if not (isinstance(stored, dict) and isinstance(stored.get("model"), dict)):
        raise ConversionError(f"{file}: not a Megatron rank file (no 'model' state dict in it)")
    return stored


# metadata.json: which backends wrote the checkpoint, as megatron-core's CheckpointingConfig records them
TORCH_DIST_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                     "common_backend_version": 1}


def read_args(src: Path) -> Tuple[Path, Dict[str, Any]]:
    path = checkpoint_path(src)
    ranks = legacy_ranks(path)
    if ranks:
        stored = load_legacy(ranks[min(ranks)])
    elif (path / COMMON_FILE).is_file():
        stored = safe_torch_load(path / COMMON_FILE)
    else:
        raise ConversionError(f"{path}: neither {COMMON_FILE} (torch_dist) nor mp_rank_*/{LEGACY_FILE} (legacy)")
    args = stored.get("args") if isinstance(stored, dict) else None
    if not isinstance(args, dict) or "model" not in args:
        raise ConversionError(f"{path}: no model args stored; only checkpoints of this pipeline's megatron backend "
                              f"or `pipeline convert` are read")
    return path, args


def stored_key(name: str) -> Tuple[str, Optional[int]]:
    """torch_dist key and layer of a global name: layers are stacked under one key."""
    layer, rest = layer_of(name)
    return (f"decoder.layers.{rest}", layer) if layer is not None else (name, None)


def meta_like(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")


# ----------------------------------------------------------------------------- reading

def read_tensors(path: Path, args: Dict[str, Any], names: List[Tuple[Mapping, str]],
                 meta: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
    """(global name, global tensor) for every requested name, from either format; `meta`: shapes and
    dtypes only, on the meta device, without reading data."""
    ranks = legacy_ranks(path)
    if ranks:
        yield from _read_legacy(path, ranks, args, names, meta)
        return
    reader = TorchDistReader(path)
    for _, name in names:
        yield name, reader.read(name, meta)


class TorchDistReader:
    """One layer's tensor at a time from a torch_dist checkpoint, assembled from whatever chunks it was
    saved in (a TP-sharded training checkpoint stores each rank's part as its own chunk)."""

    def __init__(self, path: Path):
        if not (path / ".metadata").is_file():
            raise ConversionError(f"{path}: no .metadata; not a torch_dist checkpoint (or its save did not finish)")
        self.path, self.reader = path, FileSystemReader(str(path))
        self.metadata = load_dcp_metadata(path / ".metadata")  # not reader.read_metadata(): that is plain pickle
        self.reader.set_up_storage_reader(self.metadata, True)

    def read(self, name: str, meta: bool = False) -> torch.Tensor:
        key, layer = stored_key(name)
        stored = self.metadata.state_dict_metadata.get(key)
        if not isinstance(stored, TensorStorageMetadata):
            raise ConversionError(f"{self.path}: missing tensor {key} (for {name})")
        if layer is not None and layer >= stored.size[0]:
            raise ConversionError(f"{self.path}: {key} stacks {stored.size[0]} layers; {name} is not among them")
        shape = tuple(stored.size[1:] if layer is not None else stored.size)
        if meta:
            return torch.empty(shape, dtype=stored.properties.dtype, device="meta")
        region = (1, *shape) if layer is not None else shape
        out = torch.empty(region, dtype=stored.properties.dtype)
        offsets = (layer, *[0] * len(shape)) if layer is not None else (0,) * len(shape)
        items = create_read_items_for_chunk_list(key, stored, [ChunkStorageMetadata(torch.Size(offsets),
                                                                                    torch.Size(region))])
        target = _ReadInto(out)
        self.reader.read_data(LoadPlan(items), target).wait()
        if target.filled != out.numel():
            raise ConversionError(f"{self.path}: the stored chunks of {key} cover {target.filled} of the "
                                  f"{out.numel()} values of {name}")
        return out[0] if layer is not None else out


class _ReadInto:
    """The part of DCP's load planner that FileSystemReader.read_data uses: where each read lands."""

    def __init__(self, out: torch.Tensor):
        self.out, self.filled = out, 0

    def resolve_tensor(self, item):
        return narrow_tensor_by_index(self.out, item.dest_offsets, item.lengths)

    def commit_tensor(self, item, tensor) -> None:
        self.filled += tensor.numel()


def _read_legacy(path, ranks, args, names, meta):
    tp, pp = 1 + max(t for t, _ in ranks), 1 + max(p for _, p in ranks)
    if len(ranks) != tp * pp:
        raise ConversionError(f"{path}: {len(ranks)} rank files for a {tp} x {pp} TP x PP layout; some are missing")
    layers_per_stage = args["model"]["num_layers"] // pp
    for mapping, name in names:
        stage, local = stage_of(name, layers_per_stage, pp)
        parts = []
        for t in range(tp):
            # a fresh memory map per tensor (a pickle parse): the pages a read touches are released with
            # the tensor, instead of a whole stage's files staying resident
            shard = load_legacy(ranks[(t, stage)])["model"]
            if local not in shard:
                raise ConversionError(f"{ranks[(t, stage)]}: missing tensor {local} (global {name})")
            parts.append(meta_like(shard[local]) if meta else shard[local])
        yield name, merge_tp(parts, tp_kind(mapping, name))


# ----------------------------------------------------------------------------- writing

class _ReproducibleWriter(FileSystemWriter):
    """DCP's writer without the storage metadata: its fresh save id (a uuid) and its path (our temp dir,
    renamed once published) would make each conversion's `.metadata` differ. The same model converts to
    the same bytes; readers take a missing storage_meta (DCP files written before torch 2.4 have none)."""

    def storage_meta(self):
        return None


def write_torch_dist(dst: Path, args: Dict[str, Any], planned: List[Tuple[str, torch.Tensor]],
                     tensors: Iterator[Tuple[Mapping, str, torch.Tensor]]) -> None:
    """`planned`: every (global name, meta tensor) in the order `tensors` will yield them. DCP writes in
    plan order (one file, one thread) and asks for each tensor only when it writes it."""
    folder = iteration_dir(dst, 0)
    folder.mkdir()
    # no fsync, like the HF side and the copy baseline: a crash before `publishing` renames loses nothing
    writer = _ReproducibleWriter(str(folder), single_file_per_rank=True, thread_count=1, sync_files=False)
    planner = StreamingSavePlanner(planned, args["model"]["num_layers"], tensors)
    save({}, storage_writer=writer, planner=planner, no_dist=True)
    torch.save({"iteration": 0, "args": args}, folder / COMMON_FILE)
    (folder / "metadata.json").write_text(json.dumps(TORCH_DIST_CONFIG))
    (dst / TRACKER).write_text("0")


def _write_item(name: str, tensor: torch.Tensor, num_layers: int):
    """The DCP write item for one global tensor: a layer is a [1, ...] chunk of its stacked key."""
    key, layer = stored_key(name)
    shape = tuple(tensor.shape)
    if layer is None:
        offsets, sizes, size = (0,) * len(shape), shape, shape
    else:
        offsets, sizes, size = (layer, *[0] * len(shape)), (1, *shape), (num_layers, *shape)
    chunk = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
    return WriteItem(index=MetadataIndex(key, torch.Size(offsets)), type=WriteItemType.SHARD,
                     tensor_data=TensorWriteData(chunk=chunk, properties=TensorProperties(dtype=tensor.dtype),
                                                 size=torch.Size(size)))


class StreamingSavePlanner(DefaultSavePlanner):
    """A save plan made from shapes alone; each tensor is produced when the writer asks for it.
    (DCP's default planner wants the whole state dict in memory up front.)"""

    def __init__(self, planned: List[Tuple[str, torch.Tensor]], num_layers: int,
                 tensors: Iterator[Tuple[Mapping, str, torch.Tensor]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.items = [_write_item(name, t, num_layers) for name, t in planned]
        self.names = {item.index: name for item, (name, _) in zip(self.items, planned)}
        self.tensors = tensors

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self.items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        _, name, tensor = next(self.tensors)
        if name != self.names[write_item.index]:  # the plan and the stream must agree on the order
            raise RuntimeError(f"torch_dist writer expected {self.names[write_item.index]}, got {name}")
        return tensor.unsqueeze(0) if stored_key(name)[1] is not None else tensor


def write_legacy_rank(dst: Path, args: Dict[str, Any], tensors: Iterator[Tuple[Mapping, str, torch.Tensor]], tp: int,
                      tp_rank: int, pp: int, stage: int) -> None:
    """One rank file (`tp_rank` of pipeline stage `stage`), from that stage's global tensors."""
    per_stage = args["model"]["num_layers"] // pp
    model: Dict[str, torch.Tensor] = {}
    for mapping, name, tensor in tensors:
        where, local = stage_of(name, per_stage, pp)
        assert where == stage, (name, where, stage)
        shard = split_tp(tensor, tp_kind(mapping, name), tp)[tp_rank]
        # a view would save (and keep alive) the whole tensor's storage
        model[local] = shard if shard.untyped_storage().nbytes() == shard.nbytes else shard.clone()
    if args["model"]["tie_word_embeddings"] and pp > 1 and stage == pp - 1:
        # megatron-core keeps the tied output weight on the last stage too
        first = load_legacy(iteration_dir(dst, 0) / rank_dir(tp_rank, 0, pp) / LEGACY_FILE)["model"]
        model["output_layer.weight"] = first["embedding.word_embeddings.weight"].clone()
    folder = iteration_dir(dst, 0) / rank_dir(tp_rank, stage, pp)
    folder.mkdir(parents=True)
    torch.save({"model": model, "args": args, "iteration": 0, "checkpoint_version": 3.0}, folder / LEGACY_FILE)


def rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
