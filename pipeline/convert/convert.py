"""Checkpoint conversion HF <-> Megatron (torch_dist or legacy torch, any TP/PP) and Megatron <->
Megatron (another layout or format), through each family's mapping table.

Every direction streams global tensors (megatron_io.py reads and writes the Megatron formats), writes
into `<dst>.partial` and renames it into place only when complete: a failed conversion leaves nothing
at `dst`. Megatron output follows Megatron-LM's layout: `<dst>/iter_0000000/` and
`<dst>/latest_checkpointed_iteration.txt`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import torch

from pipeline.convert.families import FAMILIES, by_architecture
from pipeline.convert.mapping import ConversionError, Family, Geometry, hf_names
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


def write_safetensors(tensors: Iterator[Tuple[str, torch.Tensor]], dst: Path, max_shard_bytes: int) -> None:
    """Shards of at most max_shard_bytes, written as they fill, plus the index when there is more than one."""
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0

    def flush():
        if current:
            shards.append(dict(current))
            save_file(current, str(dst / f"shard-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            current.clear()

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        current[name], size = t.contiguous(), size + nbytes
    flush()
    total = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        final = "model.safetensors" if total == 1 else f"model-{i:05d}-of-{total:05d}.safetensors"
        os.replace(dst / f"shard-{i:05d}.safetensors", dst / final)
        weight_map.update({name: final for name in shard})
    if total > 1:
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                     indent=2))


# ----------------------------------------------------------------------------- conversions

FORMATS = ("torch_dist", "torch")


def cast(tensor: torch.Tensor, dtype: Optional[str]) -> torch.Tensor:
    return tensor.to(DTYPES[dtype]) if dtype else tensor


def write_megatron(dst: Path, args: Dict[str, Any], tensors, fmt: str, tp: int, pp: int) -> None:
    if fmt not in FORMATS:
        raise ConversionError(f"format: '{fmt}' is not one of {', '.join(FORMATS)}")
    with single_process_group(), publishing(dst) as out:
        if fmt == "torch_dist":  # global tensors: any TP/PP loads it; tp only decided the vocab padding
            megatron_io.write_torch_dist(out, args, tensors)
        else:
            megatron_io.write_legacy(out, args, tensors, tp, pp)


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
        def tensors():
            for meg, tensor in megatron_io.read_tensors(path, args, [(m, meg) for meg, m in mappings.items()]):
                for name, t in zip(mappings[meg].hf, mappings[meg].to_hf(tensor, geo)):
                    yield name, cast(t, dtype)

        with publishing(dst) as out:
            write_safetensors(tensors(), out, max_shard_size)
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
    tensors = ((m, meg, cast(m.to_megatron([reader.get(n) for n in hfs], geo), dtype)) for m, meg, hfs in entries)
    write_megatron(dst, args, tensors, fmt, tp, pp)
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
        tensors = ((mappings[meg], meg, cast(t, dtype))
                   for meg, t in megatron_io.read_tensors(path, args, [(m, meg) for meg, m in mappings.items()]))
        write_megatron(dst, args, tensors, fmt, tp, pp)
    return {"tensors": len(mappings), "format": fmt, "source": str(path)}
