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
    iter_0000001/mp_rank_TT/model_optim_rng.pt           (pp = 1)
    iter_0000001/mp_rank_TT_PPP/model_optim_rng.pt       (pp > 1)
each file holding {"model": that rank's shard, local layer numbers}, "args", "iteration",
"checkpoint_version"} (with virtual pipeline stages, "model0", "model1", ... instead of "model"; the
tracker file may say `release`, for a `release/` dir).

Megatron-LM's own checkpoints are read too: their `args` (Megatron-LM's argparse.Namespace) translate
through pipeline/formats/megatron_args.py, and names are matched loosely where Megatron-LM varies: a
`module.` prefix, the norms under Transformer Engine's names (`linear_qkv.layer_norm_weight`) or
megatron-core's local ones (`input_layernorm.weight`, `pre_mlp_layernorm.weight`), torch_dist layers
stacked under one key or one key per layer, a gated fc1 as one tensor or as `_w`/`_v` halves (megatron-core
writes those two with the `singleton_local_shards` or `non_homogeneous_layers` metadata Megatron-LM passes).
tests/e2e/test_megatron_lm_checkpoints.py reads each variant from files megatron-core itself wrote.
Everything else a checkpoint holds (optimizer and RNG state, `_extra_state`) is never read. What we
write stores Megatron-LM's args (the Namespace, our dict riding along in it), checkpoint_version 3.0
and iteration 1; legacy files name the norms as `transformer_impl` (transformer_engine or local) does.

How a tensor splits across TP follows one rule per kind (TP_RULES): column
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
from pipeline.formats import megatron_args
from pipeline.formats.checkpoints import TRACKER, iteration_dir, tracked_dir
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
RANK_DIR = re.compile(r"mp_rank_(\d+)(?:_(\d+))?(_\d+)?$")
ITERATION = 1  # of what we write: Megatron-LM treats iteration 0 as no training done
# Transformer Engine's names for the norms fused into the next linear layer -> megatron-core's local layers'
LOCAL_NORMS = {"self_attention.linear_qkv.layer_norm_": "input_layernorm.",
               "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm."}


def local_name(name: str) -> str:
    """A TE-style norm name as megatron-core's local layers (transformer_impl=local) save it."""
    for te, local in LOCAL_NORMS.items():
        if te in name:
            return name.replace(te, local)
    return name


def spellings(name: str) -> List[str]:
    """The names a tensor may be stored under: ours (TE norms), the local norms'."""
    return list(dict.fromkeys([name, local_name(name)]))


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
    path = tracked_dir(src)
    if path is None:
        raise ConversionError(f"{src}: no {TRACKER}; expected a Megatron checkpoint dir (iter_XXXXXXX/ + tracker)")
    return path


def legacy_ranks(path: Path) -> Dict[Tuple[int, int], Path]:
    """(tp rank, pp rank) -> file, for a legacy iteration dir; {} for torch_dist."""
    ranks = {}
    for d in path.iterdir():
        m = RANK_DIR.match(d.name)
        if m and (d / LEGACY_FILE).is_file():
            if m.group(3):
                raise ConversionError(f"{d}: an expert-parallel rank (mixture of experts), which no model family here "
                                      f"holds")
            ranks[(int(m.group(1)), int(m.group(2) or 0))] = d / LEGACY_FILE
    return ranks


def load_legacy(file: Path) -> Dict[str, Any]:
    """Restricted to plain tensors and containers (pipeline/safeload.py)."""
    stored = safe_torch_load(file, mmap=True)
    if not (isinstance(stored, dict) and (isinstance(stored.get("model"), dict)
                                          or isinstance(stored.get("model0"), dict))):
        raise ConversionError(f"{file}: not a Megatron rank file (no 'model' state dict in it)")
    return stored


def chunks_of(stored: Dict[str, Any], file: Path) -> List[Dict[str, Any]]:
    """A rank file's model chunks (one per virtual pipeline stage), names without a `module.` prefix."""
    if isinstance(stored.get("model"), dict):
        found = [stored["model"]]
    else:
        found = [stored[f"model{v}"] for v in range(len(stored)) if isinstance(stored.get(f"model{v}"), dict)]
    out = [{(k[len("module."):] if k.startswith("module.") else k): t for k, t in chunk.items()} for chunk in found]
    if any(k.startswith("language_model.") for chunk in out for k in chunk):
        raise ConversionError(f"{file}: a megatron.legacy model (language_model.*); only megatron-core (mcore) "
                              f"GPT checkpoints are read")
    return out


# metadata.json: which backends wrote the checkpoint, as megatron-core's CheckpointingConfig records them
TORCH_DIST_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                     "common_backend_version": 1}


def read_args(src: Path) -> Tuple[Path, Dict[str, Any]]:
    """The checkpoint's iteration dir and its args as our dict (pipeline/formats/megatron_args.py): this
    pipeline's own (a dict, or carried in the Namespace it writes) or translated from Megatron-LM's."""
    path = checkpoint_path(src)
    if not path.is_dir():
        raise ConversionError(f"{src / TRACKER} names {path.name}, which is not there")
    ranks = legacy_ranks(path)
    if ranks:
        stored = load_legacy(ranks[min(ranks)])
    elif (path / COMMON_FILE).is_file():
        stored = safe_torch_load(path / COMMON_FILE)
    else:
        raise ConversionError(f"{path}: neither {COMMON_FILE} (torch_dist) nor mp_rank_*/{LEGACY_FILE} (legacy)")
    args = megatron_args.our_args(stored.get("args") if isinstance(stored, dict) else None, str(path))
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
        for spelled in spellings(name):
            for prefix in ("", "module."):
                found = self._find(spelled, prefix)
                if found is not None:
                    return found(meta)
        raise ConversionError(f"{self.path}: missing tensor {stored_key(name)[0]} (for {name})")

    def _find(self, name: str, prefix: str):
        """How to read `name` from what is stored under `prefix`: its stacked key, its own key (layers not
        stacked), or a gated fc1's `_w`/`_v` halves; None when none of them is there."""
        stored = self.metadata.state_dict_metadata
        key, layer = stored_key(name)
        key, name = prefix + key, prefix + name
        if isinstance(stored.get(key), TensorStorageMetadata):
            return lambda meta: self._read(key, layer, name, meta)
        if layer is not None and isinstance(stored.get(name), TensorStorageMetadata):
            return lambda meta: self._read(name, None, name, meta)
        for halves in ((key + "_w", key + "_v"), (name + "_w", name + "_v")):
            if all(isinstance(stored.get(h), TensorStorageMetadata) for h in halves):
                at = layer if halves[0].startswith(key) else None
                return lambda meta: torch.cat([self._read(h, at, name, meta) for h in halves])
        return None

    def _read(self, key: str, layer: Optional[int], name: str, meta: bool) -> torch.Tensor:
        stored = self.metadata.state_dict_metadata[key]
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


def locate(name: str, num_layers: int, pp: int, vpp: int) -> Tuple[int, int, str]:
    """(pipeline rank, virtual stage, local name) of a global name. With virtual stages the model is cut
    into pp x vpp chunks of layers, dealt round-robin: chunk c sits on rank c % pp as its stage c // pp."""
    per_chunk = num_layers // (pp * vpp)
    layer, rest = layer_of(name)
    if layer is not None:
        chunk = layer // per_chunk
        return chunk % pp, chunk // pp, f"decoder.layers.{layer % per_chunk}.{rest}"
    return (0, 0, name) if name.startswith("embedding.") else (pp - 1, vpp - 1, name)


def _read_legacy(path, ranks, args, names, meta):
    tp, pp = 1 + max(t for t, _ in ranks), 1 + max(p for _, p in ranks)
    if len(ranks) != tp * pp:
        raise ConversionError(f"{path}: {len(ranks)} rank files for a {tp} x {pp} TP x PP layout; some are missing")
    vpp = len(chunks_of(load_legacy(ranks[(0, 0)]), ranks[(0, 0)]))
    num_layers = args["model"]["num_layers"]
    if num_layers % (pp * vpp):
        raise ConversionError(f"{path}: {num_layers} layers do not split evenly into {pp} x {vpp} pipeline chunks "
                              f"(an uneven split is not read)")
    for mapping, name in names:
        stage, chunk, local = locate(name, num_layers, pp, vpp)
        parts = []
        for t in range(tp):
            # a fresh memory map per tensor (a pickle parse): the pages a read touches are released with
            # the tensor, instead of a whole stage's files staying resident
            file = ranks[(t, stage)]
            shard = chunks_of(load_legacy(file), file)[chunk]
            spelled = next((n for n in spellings(local) if n in shard), None)
            if spelled is None:
                raise ConversionError(f"{file}: missing tensor {local} (global {name})")
            parts.append(meta_like(shard[spelled]) if meta else shard[spelled])
        yield name, merge_tp(parts, tp_kind(mapping, name))


# ----------------------------------------------------------------------------- writing

class _ReproducibleWriter(FileSystemWriter):
    """DCP's writer without the storage metadata: its fresh save id (a uuid) and its path (our temp dir,
    renamed once published) would make each conversion's `.metadata` differ. The same model converts to
    the same bytes; readers take a missing storage_meta (DCP files written before torch 2.4 have none)."""

    def storage_meta(self):
        return None


def stored_args(args: Dict[str, Any], planned: List[Tuple[str, torch.Tensor]], tp: int, pp: int, fmt: str,
                transformer_impl: str = "transformer_engine"):
    """The `args` a checkpoint we write stores: Megatron-LM's Namespace for this layout and precision."""
    dtype = next((t.dtype for _, t in planned if t.is_floating_point()), torch.float32)
    return megatron_args.namespace(args, tp, pp, transformer_impl=transformer_impl, dtype=dtype,
                                   iteration=ITERATION, ckpt_format=fmt)


def write_torch_dist(dst: Path, args: Dict[str, Any], planned: List[Tuple[str, torch.Tensor]],
                     tensors: Iterator[Tuple[Mapping, str, torch.Tensor]], tp: int = 1) -> None:
    """`planned`: every (global name, meta tensor) in the order `tensors` will yield them. DCP writes in
    plan order (one file, one thread) and asks for each tensor only when it writes it. Norms keep TE's
    names: megatron-core's local layers map theirs onto them in a sharded state dict."""
    folder = iteration_dir(dst, ITERATION)
    folder.mkdir()
    # no fsync, like the HF side and the copy baseline: a crash before `publishing` renames loses nothing
    writer = _ReproducibleWriter(str(folder), single_file_per_rank=True, thread_count=1, sync_files=False)
    planner = StreamingSavePlanner(planned, args["model"]["num_layers"], tensors)
    save({}, storage_writer=writer, planner=planner, no_dist=True)
    torch.save({"iteration": ITERATION, "checkpoint_version": megatron_args.CHECKPOINT_VERSION,
                "args": stored_args(args, planned, tp, 1, "torch_dist")}, folder / COMMON_FILE)
    (folder / "metadata.json").write_text(json.dumps(TORCH_DIST_CONFIG))
    (dst / TRACKER).write_text(str(ITERATION))


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


def write_legacy_rank(dst: Path, args: Any, tensors: Iterator[Tuple[Mapping, str, torch.Tensor]], tp: int,
                      tp_rank: int, pp: int, stage: int, transformer_impl: str = "transformer_engine") -> None:
    """One rank file (`tp_rank` of pipeline stage `stage`), from that stage's global tensors; `args` the
    Namespace it stores (stored_args), or our dict. transformer_impl=local names the norms as
    megatron-core's local layers do."""
    if isinstance(args, dict):
        args = megatron_args.namespace(args, tp, pp, transformer_impl=transformer_impl, iteration=ITERATION)
    ours = megatron_args.our_args(args, str(dst))
    per_stage = ours["model"]["num_layers"] // pp
    rename = local_name if transformer_impl == "local" else (lambda n: n)
    model: Dict[str, torch.Tensor] = {}
    for mapping, name, tensor in tensors:
        where, local = stage_of(name, per_stage, pp)
        assert where == stage, (name, where, stage)
        shard = split_tp(tensor, tp_kind(mapping, name), tp)[tp_rank]
        # a view would save (and keep alive) the whole tensor's storage
        model[rename(local)] = shard if shard.untyped_storage().nbytes() == shard.nbytes else shard.clone()
    if ours["model"]["tie_word_embeddings"] and pp > 1 and stage == pp - 1:
        # megatron-core keeps the tied output weight on the last stage too
        first = load_legacy(iteration_dir(dst, ITERATION) / rank_dir(tp_rank, 0, pp) / LEGACY_FILE)["model"]
        model["output_layer.weight"] = first["embedding.word_embeddings.weight"].clone()
    folder = iteration_dir(dst, ITERATION) / rank_dir(tp_rank, stage, pp)
    folder.mkdir(parents=True)
    torch.save({"model": model, "args": args, "iteration": ITERATION,
                "checkpoint_version": megatron_args.CHECKPOINT_VERSION}, folder / LEGACY_FILE)


def rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
