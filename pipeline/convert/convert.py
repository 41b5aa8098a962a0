"""Checkpoint conversion HF <-> Megatron (torch_dist or legacy torch, any TP/PP) and Megatron <->
Megatron (another layout or format), through each family's mapping table.

Tensors flow one at a time as global tensors (megatron_io.py reads and writes the Megatron formats).
HF output is written tensor by tensor, legacy output one pipeline stage at a time; torch_dist output
is one `dist_checkpointing.save` of the whole model. Every direction writes into `<dst>.partial` and
renames it into place only when complete: a failed conversion leaves nothing at `dst`. Megatron output follows Megatron-LM's layout: `<dst>/iter_0000000/` and
`<dst>/latest_checkpointed_iteration.txt`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from pipeline.convert.families import FAMILIES, by_architecture
from pipeline.convert.mapping import ConversionError, Family, Geometry, Mapping, hf_names
from pipeline.train.hf_entry import CONFIG_FIELDS, model_config
from pipeline.convert import megatron_io
from pipeline.train.megatron_entry import padded_vocab_size

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- shared

def geometry(model: Dict[str, Any], vocab: int, padded: int) -> Geometry:
    heads = model["num_attention_heads"]
    return Geometry(hidden=model["hidden_size"], heads=heads, groups=model.get("num_key_value_heads") or heads,
                    head_dim=model["hidden_size"] // heads, vocab=vocab, padded_vocab=padded)


@contextlib.contextmanager
def publishing(dst: Path) -> Iterator[Path]:
    """Write into <dst>.partial; it becomes <dst> only if the block completes."""
    partial = dst.with_name(dst.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(partial, dst)


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """dist_checkpointing wants a process group even in one process: a gloo group of one, no network.
    On a CPU-only host this process gets megatron-core's CPU compatibility layer (pipeline.train.megatron_cpu)."""
    import torch.distributed as dist

    from pipeline.train import megatron_cpu

    megatron_cpu.install()  # no-op with CUDA; dist_checkpointing synchronizes "CUDA" when saving
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def copy_tokenizer_files(src: Optional[Path], dst: Path) -> list:
    copied = []
    for name in TOKENIZER_FILES if src else ():
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


# ----------------------------------------------------------------------------- HF side

def hf_model_dict(config: Dict[str, Any], family: Family) -> Dict[str, Any]:
    """Our complete model.* settings from an HF config.json (the inverse of hf_entry.CONFIG_FIELDS);
    fields the family has no HF field for keep the schema's defaults."""
    from dataclasses import asdict

    from pipeline.config import ModelConfig

    model = {k: v for k, v in asdict(ModelConfig(hidden_size=0, num_layers=0, num_attention_heads=0)).items()}
    for ours, hf in CONFIG_FIELDS[family.name].items():
        if config.get(hf) is not None:
            model[ours] = config[hf]
    rope = (config.get("rope_parameters") or {}).get("rope_theta")  # transformers 5 nests it
    if rope is not None and "rope_theta" in CONFIG_FIELDS[family.name]:
        model["rope_theta"] = rope
    model["family"], model["vocab_size"] = family.name, config["vocab_size"]
    model["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", family.name == "gpt2"))
    return model


class HFReader:
    """Tensors of an HF safetensors checkpoint (single file or sharded with an index), read lazily."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = json.loads(index.read_text())["weight_map"]
        elif (path / "model.safetensors").is_file():
            files = None
        else:
            raise ConversionError(f"{path}: no model.safetensors(.index.json); only safetensors checkpoints are read "
                                  f"(re-save a .bin checkpoint with save_pretrained(safe_serialization=True))")
        names = sorted(set(files.values())) if files else ["model.safetensors"]
        self.handles = {n: safe_open(str(path / n), framework="pt") for n in names}
        self.where = files or {k: "model.safetensors" for k in self.handles["model.safetensors"].keys()}

    def names(self):
        return set(self.where)

    def get(self, name: str) -> torch.Tensor:
        return self.handles[self.where[name]].get_tensor(name)


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
                      torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


class SafetensorsWriter:
    """HF safetensors shards written tensor by tensor, so memory holds one tensor, not a shard.

    Written by hand because safetensors' own `save_file` takes a whole shard's tensors at once. The
    format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}} and the raw bytes. The header comes first but is only known at the end, so each
    shard reserves room for it (sized for every name the model has, at the widest values) and writes
    it last; the JSON is padded with spaces, as safetensors itself pads it.
    """

    def __init__(self, dst: Path, names: List[str], max_shard_bytes: int):
        widest = {"dtype": "BF16", "shape": [1 << 40] * 4, "data_offsets": [1 << 50, 1 << 50]}
        reserve = len(json.dumps({"__metadata__": {"format": "pt"}, **{n: widest for n in names}}))
        self.reserve = -(-reserve // 8) * 8
        self.dst, self.max_shard_bytes = dst, max_shard_bytes
        self.shards: List[Dict[str, Any]] = []
        self.file = None

    def _open(self) -> None:
        self.shards.append({"__metadata__": {"format": "pt"}})
        self.file = open(self.dst / f"shard-{len(self.shards):05d}.safetensors", "wb")
        self.file.write(b"\0" * (8 + self.reserve))
        self.offset = 0

    def _close_shard(self) -> None:
        header = json.dumps(self.shards[-1], separators=(",", ":")).encode()
        self.file.seek(0)
        self.file.write(struct.pack("<Q", self.reserve) + header + b" " * (self.reserve - len(header)))
        self.file.close()
        self.file = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.file is not None and self.offset and self.offset + nbytes > self.max_shard_bytes:
            self._close_shard()
        if self.file is None:
            self._open()
        self.shards[-1][name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                                 "data_offsets": [self.offset, self.offset + nbytes]}
        self.file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.offset += nbytes

    def close(self) -> None:
        """The last header, the final names (model.safetensors or model-0000i-of-0000n), and the index."""
        if self.file is not None:
            self._close_shard()
        total, weight_map = len(self.shards), {}
        for i, shard in enumerate(self.shards, 1):
            final = "model.safetensors" if total == 1 else f"model-{i:05d}-of-{total:05d}.safetensors"
            os.replace(self.dst / f"shard-{i:05d}.safetensors", self.dst / final)
            weight_map.update({name: final for name in shard if name != "__metadata__"})
        if total > 1:
            (self.dst / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


# ----------------------------------------------------------------------------- conversions

FORMATS = ("torch_dist", "torch")


def progress(items, total: int, desc: str):
    """A tensors-done bar on a terminal; silent in logs and tests."""
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit="tensor", disable=not sys.stderr.isatty())


def cast(tensor: torch.Tensor, dtype: Optional[str]) -> torch.Tensor:
    return tensor.to(DTYPES[dtype]) if dtype else tensor


def write_megatron(dst: Path, args: Dict[str, Any], names: List[Tuple[Mapping, str]], produce, fmt: str, tp: int,
                   pp: int) -> None:
    """produce(names) yields (mapping, name, global tensor) for the names asked. torch_dist asks for all
    at once (one dist_checkpointing.save); legacy asks one pipeline stage at a time and writes that
    stage's rank files before the next, so it holds about 1/pp of the model."""
    if fmt not in FORMATS:
        raise ConversionError(f"format: '{fmt}' is not one of {', '.join(FORMATS)}")
    with single_process_group(), publishing(dst) as out:
        if fmt == "torch_dist":  # global tensors: any TP/PP loads it; tp only decided the vocab padding
            megatron_io.write_torch_dist(out, args, produce(names))
            return
        num_layers = args["model"]["num_layers"]
        if num_layers % pp:
            raise ConversionError(f"pp={pp}: {num_layers} layers do not split evenly into {pp} pipeline stages")
        for stage in range(pp):
            mine = [(m, n) for m, n in names if megatron_io.stage_of(n, num_layers // pp, pp)[0] == stage]
            megatron_io.write_legacy_stage(out, args, produce(mine), tp, pp, stage)
        (out / megatron_io.TRACKER).write_text("0")


def megatron_to_hf(src: Path, dst: Path, dtype: Optional[str] = None, tokenizer: Optional[Path] = None,
                   max_shard_size: int = 5 << 30) -> Dict[str, Any]:
    """A Megatron checkpoint dir (torch_dist or legacy, any TP/PP) -> an HF dir: safetensors (sharded
    with an index above max_shard_size), config.json, generation_config.json, every tokenizer file."""
    from transformers import GenerationConfig

    path, args = megatron_io.read_args(src)
    model = args["model"]
    family = FAMILIES[model["family"]]
    geo = geometry(model, args["vocab_size"], args["padded_vocab_size"])
    mappings = {meg: m for m, meg, _ in family.expanded(model["num_layers"], model["tie_word_embeddings"])}
    with single_process_group():
        with publishing(dst) as out:
            writer = SafetensorsWriter(out, [n for m in mappings.values() for n in m.hf], max_shard_size)
            stream = megatron_io.read_tensors(path, args, [(m, meg) for meg, m in mappings.items()])
            for meg, tensor in progress(stream, len(mappings), f"{path.name} -> hf"):
                for name, t in zip(mappings[meg].hf, mappings[meg].to_hf(tensor, geo)):
                    writer.add(name, cast(t, dtype))
            writer.close()
            config = model_config(model, args["vocab_size"], args.get("eod_id") or 0)
            config.architectures = [family.architectures[0]]
            if dtype:
                config.dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
            config.save_pretrained(str(out))
            GenerationConfig.from_model_config(config).save_pretrained(str(out))
            source_tokenizer = tokenizer or (Path(args["tokenizer_dir"]) if args.get("tokenizer_dir") else None)
            copied = copy_tokenizer_files(source_tokenizer, out)
    return {"tensors": len(mappings), "tokenizer_files": copied, "source": str(path)}


def hf_to_megatron(src: Path, dst: Path, tp: int = 1, pp: int = 1, fmt: str = "torch_dist",
                   make_vocab_size_divisible_by: int = 128, dtype: Optional[str] = None) -> Dict[str, Any]:
    """An HF dir -> a Megatron checkpoint dir. The embedding is padded for `tp` (Megatron pads to a
    multiple of make_vocab_size_divisible_by x tp); torch_dist then loads at any TP/PP, legacy files
    are written for exactly tp x pp ranks."""
    config = json.loads((src / "config.json").read_text())
    family = by_architecture((config.get("architectures") or ["?"])[0])
    model = hf_model_dict(config, family)
    padded = padded_vocab_size(config["vocab_size"], make_vocab_size_divisible_by, tp)
    geo = geometry(model, config["vocab_size"], padded)
    entries = family.expanded(model["num_layers"], model["tie_word_embeddings"])
    reader = HFReader(src)
    consumed = hf_names(entries)
    extra = sorted(n for n in reader.names() - set(consumed)
                   if not n.endswith(family.ignorable_hf)
                   and not (model["tie_word_embeddings"] and n == family.hf_output))
    missing = sorted(set(consumed) - reader.names())
    if extra or missing:
        raise ConversionError(f"{src}: tensors not in the {family.name} table: {extra[:10]}; "
                              f"tensors the table needs but the checkpoint lacks: {missing[:10]}")
    args = {"model": model, "vocab_size": config["vocab_size"], "padded_vocab_size": padded,
            "make_vocab_size_divisible_by": make_vocab_size_divisible_by, "eod_id": config.get("eos_token_id"),
            "tokenizer_dir": str(src)}
    def produce(names):
        for m, meg in progress(names, len(names), f"hf -> {fmt}"):
            yield m, meg, cast(m.to_megatron([reader.get(n) for n in m.hf], geo), dtype)

    write_megatron(dst, args, [(m, meg) for m, meg, _ in entries], produce, fmt, tp, pp)
    return {"tensors": len(entries), "padded_vocab_size": padded, "format": fmt}


def megatron_to_megatron(src: Path, dst: Path, tp: int = 1, pp: int = 1, fmt: str = "torch_dist",
                         dtype: Optional[str] = None) -> Dict[str, Any]:
    """Another layout or format, without going through HF (the embedding keeps its padding)."""
    path, args = megatron_io.read_args(src)
    model = args["model"]
    family = FAMILIES[model["family"]]
    if fmt == "torch" and args["padded_vocab_size"] % tp:
        raise ConversionError(f"tp={tp}: the {args['padded_vocab_size']}-row embedding does not split into {tp} "
                              f"equal parts; convert from HF with this tp instead")
    mappings = {meg: m for m, meg, _ in family.expanded(model["num_layers"], model["tie_word_embeddings"])}
    with single_process_group():
        def produce(names):
            for meg, t in progress(megatron_io.read_tensors(path, args, names), len(names), f"-> {fmt}"):
                yield mappings[meg], meg, cast(t, dtype)

        write_megatron(dst, args, [(m, meg) for meg, m in mappings.items()], produce, fmt, tp, pp)
    return {"tensors": len(mappings), "format": fmt, "source": str(path)}
