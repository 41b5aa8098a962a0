"""Checkpoint conversion HF <-> Megatron (torch_dist or legacy torch, any TP/PP) and Megatron <->
Megatron (another layout or format), through each family's mapping table.

Tensors flow one at a time as global tensors (megatron_io.py reads and writes the Megatron formats):
HF and torch_dist output is written tensor by tensor, legacy output one rank file at a time. Writing
Megatron output takes two passes over the source: shapes first (the transforms run on meta tensors,
so a bad checkpoint fails before anything is written), then the data; a TP/PP split that does not
divide the model is refused before either. Every direction writes into `<dst>.partial` and puts it in
place only when complete: a failed conversion (a full disk included) leaves `dst` as it was. With a
`check` (`pipeline convert ... verify=true`: verify.run of src against the partial) it is published only
if the report passed; otherwise it is kept at `<dst>.verify-failed`, unpublished. What may
be at `dst` beforehand is pipeline/destination.py's rule (nothing is replaced without overwrite=true).
Megatron output follows Megatron-LM's layout: `<dst>/iter_0000001/` and
`<dst>/latest_checkpointed_iteration.txt`, its `args` Megatron-LM's (pipeline/formats/megatron_args.py);
Megatron-LM's own checkpoints are read too.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import struct
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Protocol, Tuple

import torch

from pipeline import destination
from pipeline.config import layout_problem
from pipeline.convert import megatron_io
from pipeline.data.tokenizer import copy_tokenizer
from pipeline.errors import ConfigError, ConversionError
from pipeline.files import replace_dir, storage_cause
from pipeline.formats import megatron_args
from pipeline.models import FAMILIES, by_architecture
from pipeline.models.hf_config import ffn_size, head_dim, model_config, model_from_hf, padded_vocab_size
from pipeline.models.mapping import Family, Geometry, Mapping, hf_names

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- shared

def geometry(model: Dict[str, Any], vocab: int, padded: int) -> Geometry:
    heads = model["num_attention_heads"]
    return Geometry(hidden=model["hidden_size"], heads=heads, groups=model.get("num_key_value_heads") or heads,
                    head_dim=head_dim(model), vocab=vocab, padded_vocab=padded)


PARTIAL_MARK = ".pipeline-convert-partial"  # in <dst>.partial while it is written: a leftover is ours to remove
FAILED = ".verify-failed"  # <dst><FAILED>: a complete conversion whose check did not pass, kept, never published


class Check(Protocol):
    """What publishing runs on a complete output before it is published (verify.py `ConvertCheck`; passed in,
    since verify builds on this module)."""

    def __call__(self, out: Path) -> Dict[str, Any]:
        """out's report: {"passed": bool, "problem": str when not}."""

    def moved(self, where: Path, named: Path) -> Tuple[Dict[str, Any], Path]:
        """The report of the output now at `where`, rewritten to name `named`, and its path."""


@contextlib.contextmanager
def publishing(dst: Path, sources: List[Optional[Path]], overwrite: bool,
               check: Optional[Check] = None) -> Iterator[Path]:
    """Write into <dst>.partial; it replaces <dst> only if the block completes (and, with `check`, its
    report passed). What may be at <dst> (given `sources` and `overwrite`) is checked first, by
    pipeline/destination.py's rule. A complete output that fails its check goes to <dst>.verify-failed
    (deleting nothing; <dst> stays as it was) and the error says where it is."""
    dst = destination.check(dst, sources, overwrite)
    partial = dst.with_name(dst.name + ".partial")
    failed = dst.with_name(dst.name + FAILED)
    if check is not None and os.path.lexists(failed):
        raise ConfigError(f"dst: {failed} (the output of an earlier conversion that failed verify) is in the way; "
                          f"nothing was written. Look at it, then move or remove it")
    if os.path.lexists(partial):
        if partial.is_symlink() or not (partial / PARTIAL_MARK).is_file():
            raise ConversionError(f"{partial} is in the way and is not a partial output of pipeline convert (no "
                                  f"{PARTIAL_MARK}); nothing was written. Move it away")
        shutil.rmtree(partial)  # left by a killed conversion
    made = False
    try:
        partial.mkdir(parents=True)
        made = True
        (partial / PARTIAL_MARK).touch()
        yield partial
        (partial / PARTIAL_MARK).unlink()
        if check is not None:
            checked(partial, dst, failed, check)
        replace_dir(partial, dst)
    except BaseException as e:
        cause = storage_cause(e, partial if made else partial.parent)
        full = cause is not None and cause[0] == errno.ENOSPC
        if made:
            shutil.rmtree(partial, ignore_errors=True)
        if full:
            raise ConversionError(f"{dst}: no space left on device; the partial output {partial.name} was removed "
                                  f"and {dst} is as it was. Free some space or choose another dst") from e
        raise


def checked(partial: Path, dst: Path, failed: Path, check: Check) -> None:
    """Run the check on the complete partial; on a failed (or crashed) check move it to `failed` and raise."""
    try:
        report = check(partial)
    except Exception as e:
        os.replace(partial, failed)
        raise ConversionError(f"{dst}: verify could not run ({e}); the converted output was not published: it is "
                              f"kept at {failed}, and {dst} is as it was") from e
    if report["passed"]:
        check.moved(partial, dst)  # the report names where it is published
        return
    os.replace(partial, failed)
    report, path = check.moved(failed, failed)
    raise ConversionError(f"{report['problem']}. The converted output was not published: it is kept at {failed} "
                          f"(report: {path}), and {dst} is as it was")


# ----------------------------------------------------------------------------- HF side

def hf_model_dict(config: Dict[str, Any], family: Family) -> Dict[str, Any]:
    """Our complete model.* settings from an HF config.json, by the family's table
    (pipeline/models/hf_config.py `model_from_hf`): a field it does not account for is refused, named."""
    return model_from_hf(config, family)


class HFReader:
    """Tensors of an HF safetensors checkpoint (single file or sharded with an index), read lazily.

    Each read opens its file anew: safetensors hands out tensors that are views of a memory map of the
    whole file, and the pages a read touched stay resident while the map is open. Reopening per tensor
    (a header parse) lets each map go with its tensor, so memory holds the tensors in use, not the
    checkpoint."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = json.loads(index.read_text())["weight_map"]
        elif (path / "model.safetensors").is_file():
            with safe_open(str(path / "model.safetensors"), framework="pt") as f:
                files = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise ConversionError(f"{path}: no model.safetensors(.index.json); only safetensors checkpoints are read "
                                  f"(re-save a .bin checkpoint with save_pretrained(safe_serialization=True))")
        self.where = {name: path / file for name, file in files.items()}

    def names(self):
        return set(self.where)

    def get(self, name: str, meta: bool = False) -> torch.Tensor:
        """The tensor, or with `meta` only its shape and dtype (from the header, no data read)."""
        from safetensors import safe_open

        with safe_open(str(self.where[name]), framework="pt") as handle:
            if not meta:
                return handle.get_tensor(name)
            stored = handle.get_slice(name)
            return torch.empty(stored.get_shape(), dtype=TORCH_DTYPES[stored.get_dtype()], device="meta")


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
                      torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


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
        reserve = len(json.dumps({"__metadata__": {"format": "pt"}, **dict.fromkeys(names, widest)}))
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


def check_layout(args: Dict[str, Any], tp: int, pp: int) -> None:
    """The TP x PP split divides heads, key/value heads, FFN, layers and the padded vocab: training's
    rule (pipeline/config.py layout_problem), for either format (torch_dist loads at any split, but one
    padded for an impossible tp is of no use)."""
    model = args["model"]
    problem = layout_problem(tp, pp, model["num_attention_heads"],
                             model.get("num_key_value_heads") or model["num_attention_heads"], ffn_size(model),
                             model["num_layers"], padded_vocab=args["padded_vocab_size"])
    if problem:
        raise ConversionError(f"{problem[0]}={tp if problem[0] == 'tp' else pp}: {problem[1]}; nothing was written. "
                              f"Pick a tp/pp that divides the model, as training requires")


def write_megatron(dst: Path, args: Dict[str, Any], names: List[Tuple[Mapping, str]], produce, fmt: str, tp: int,
                   pp: int, sources: List[Optional[Path]], overwrite: bool,
                   transformer_impl: str = "transformer_engine", check: Optional[Check] = None) -> None:
    """produce(names, meta) yields (mapping, name, global tensor) for the names asked, in their order;
    with `meta` the tensors are shapes only. torch_dist plans from one meta pass, then writes tensor by
    tensor; legacy writes one rank file at a time, reading that stage's tensors once per TP rank, so it
    holds 1/(tp x pp) of the model rather than 1/pp."""
    if fmt not in FORMATS:
        raise ConversionError(f"format: '{fmt}' is not one of {', '.join(FORMATS)}")
    check_layout(args, tp, pp)
    if transformer_impl not in megatron_args.TRANSFORMER_IMPLS:
        raise ConversionError(f"transformer_impl: '{transformer_impl}' is not one of "
                              f"{', '.join(megatron_args.TRANSFORMER_IMPLS)}")
    num_layers = args["model"]["num_layers"]
    planned = [(name, t) for _, name, t in produce(names, meta=True)]  # every shape checked before writing
    with publishing(dst, sources, overwrite, check) as out:
        if fmt == "torch_dist":  # global tensors: any TP/PP loads it; tp only decided the vocab padding
            megatron_io.write_torch_dist(out, args, planned, iter(progress(produce(names), len(names), f"-> {fmt}")),
                                         tp=tp)
            return
        stored = megatron_io.stored_args(args, planned, tp, pp, fmt, transformer_impl)
        bar = progress(None, len(names) * tp, f"-> {fmt} tp={tp} pp={pp}")
        for stage in range(pp):
            mine = [(m, n) for m, n in names if megatron_io.stage_of(n, num_layers // pp, pp)[0] == stage]
            for rank in range(tp):
                megatron_io.write_legacy_rank(out, stored, produce(mine), tp, rank, pp, stage, transformer_impl)
                bar.update(len(mine))
        bar.close()
        (out / megatron_io.TRACKER).write_text(str(megatron_io.ITERATION))


def true_vocab(args: Dict[str, Any], tokenizer: Optional[Path], vocab_size: Optional[int], where: Path) -> int:
    """The vocabulary HF gets: vocab_size=, else the tokenizer's size, else what the checkpoint says
    (Megatron-LM's args hold only the padded size: it is kept, with a warning)."""
    padded = args["padded_vocab_size"]
    if vocab_size is None and tokenizer is not None and not args.get("vocab_known", True):
        from transformers import AutoTokenizer

        vocab_size = len(AutoTokenizer.from_pretrained(str(tokenizer)))
    if vocab_size is None:
        if not args.get("vocab_known", True):
            log.warning("%s: Megatron-LM's args hold only the padded vocab size (%d); the HF model keeps every "
                        "padded row. Give tokenizer=<dir>, config=<HF dir> or vocab_size=<n> for the true size",
                        where, padded)
        return args["vocab_size"]
    if not 0 < vocab_size <= padded:
        raise ConversionError(f"vocab_size={vocab_size}: must be between 1 and the checkpoint's padded vocab size "
                              f"{padded}")
    return vocab_size


CONFIG_NAMES = ("bos_token_id", "eos_token_id", "pad_token_id")  # what config= gives that Megatron-LM's args lack
SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads")


def from_hf_config(args: Dict[str, Any], config_dir: Path) -> Dict[str, Any]:
    """config=DIR: an HF config.json of this model gives the true vocabulary and the special token ids;
    one of another family or shape is refused, naming what differs."""
    file = config_dir / "config.json"
    if not file.is_file():
        raise ConversionError(f"config={config_dir}: no config.json there")
    config = json.loads(file.read_text())
    family = FAMILIES[args["model"]["family"]]
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in family.architectures:
        raise ConversionError(f"config={config_dir}: architectures {arch} is not the checkpoint's family "
                              f"{family.name} ({', '.join(family.architectures)})")
    theirs, ours = model_from_hf(config, family), args["model"]
    differ = [f"{k} {ours.get(k)} vs {theirs.get(k)}" for k in SHAPE_KEYS
              if (ours.get(k) or ours["num_attention_heads"]) != (theirs.get(k) or theirs["num_attention_heads"])]
    if differ:
        raise ConversionError(f"config={config_dir}: not this checkpoint's model ({'; '.join(differ)})")
    if not 0 < config.get("vocab_size", 0) <= args["padded_vocab_size"]:
        raise ConversionError(f"config={config_dir}: vocab_size {config.get('vocab_size')} must be between 1 and the "
                              f"checkpoint's padded vocab size {args['padded_vocab_size']}")
    names = {k: config[k] for k in CONFIG_NAMES if config.get(k) is not None}
    return {**args, "vocab_size": config["vocab_size"], "vocab_known": True,
            "hf_config": {**args.get("hf_config", {}), **names}}


def megatron_to_hf(src: Path, dst: Path, dtype: Optional[str] = None, tokenizer: Optional[Path] = None,
                   max_shard_size: int = 5 << 30, overwrite: bool = False,
                   vocab_size: Optional[int] = None, check: Optional[Check] = None,
                   config: Optional[Path] = None) -> Dict[str, Any]:
    """A Megatron checkpoint dir (torch_dist or legacy, any TP/PP; ours or Megatron-LM's) -> an HF dir:
    safetensors (sharded with an index above max_shard_size), config.json, generation_config.json,
    every tokenizer file. `vocab_size` (else `config`'s, else the tokenizer's size) cuts the padded
    embedding."""
    from transformers import GenerationConfig

    path, args = megatron_io.read_args(src)
    if config is not None:
        args = from_hf_config(args, config)
    args = {**args, "vocab_size": true_vocab(args, tokenizer, vocab_size, path)}
    model = args["model"]
    family = FAMILIES[model["family"]]
    geo = geometry(model, args["vocab_size"], args["padded_vocab_size"])
    mappings = {meg: m for m, meg, _ in family.expanded(model["num_layers"], model["tie_word_embeddings"])}
    with publishing(dst, [src, tokenizer], overwrite, check) as out:
        writer = SafetensorsWriter(out, [n for m in mappings.values() for n in m.hf], max_shard_size)
        stream = megatron_io.read_tensors(path, args, [(m, meg) for meg, m in mappings.items()])
        for meg, tensor in progress(stream, len(mappings), f"{path.name} -> hf"):
            for name, t in zip(mappings[meg].hf, mappings[meg].to_hf(tensor, geo)):
                writer.add(name, cast(t, dtype))
        writer.close()
        config = model_config(model, args["vocab_size"], args.get("eod_id") or 0)
        config.architectures = [family.architectures[0]]
        for field_name, value in args.get("hf_config", {}).items():  # what Megatron-LM's args decide beyond model.*
            setattr(config, field_name, value)
        if dtype:
            config.dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
        config.save_pretrained(str(out))
        GenerationConfig.from_model_config(config).save_pretrained(str(out))
        source_tokenizer = tokenizer or (Path(args["tokenizer_dir"]) if args.get("tokenizer_dir") else None)
        # the trained context (checkpoints written before seq_len was stored: the model's)
        copied = copy_tokenizer(source_tokenizer, out, args.get("seq_len") or model["max_position_embeddings"])
    return {"tensors": len(mappings), "tokenizer_files": copied, "source": str(path)}


def hf_to_megatron(src: Path, dst: Path, tp: int = 1, pp: int = 1, fmt: str = "torch_dist",
                   make_vocab_size_divisible_by: int = 128, dtype: Optional[str] = None,
                   overwrite: bool = False, transformer_impl: str = "transformer_engine",
                   check: Optional[Check] = None) -> Dict[str, Any]:
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
    def produce(names, meta=False):
        for m, meg in names:
            yield m, meg, cast(m.to_megatron([reader.get(n, meta) for n in m.hf], geo), dtype)

    write_megatron(dst, args, [(m, meg) for m, meg, _ in entries], produce, fmt, tp, pp, [src], overwrite,
                   transformer_impl, check)
    return {"tensors": len(entries), "padded_vocab_size": padded, "format": fmt}


def megatron_to_megatron(src: Path, dst: Path, tp: int = 1, pp: int = 1, fmt: str = "torch_dist",
                         dtype: Optional[str] = None, overwrite: bool = False,
                         transformer_impl: str = "transformer_engine",
                         check: Optional[Check] = None) -> Dict[str, Any]:
    """Another layout or format, without going through HF (the embedding keeps its padding: a tp it does
    not divide is refused; convert from HF to pad for it)."""
    path, args = megatron_io.read_args(src)
    model = args["model"]
    family = FAMILIES[model["family"]]
    mappings = {meg: m for m, meg, _ in family.expanded(model["num_layers"], model["tie_word_embeddings"])}
    def produce(names, meta=False):
        for meg, t in megatron_io.read_tensors(path, args, names, meta):
            yield mappings[meg], meg, cast(t, dtype)

    write_megatron(dst, args, [(m, meg) for meg, m in mappings.items()], produce, fmt, tp, pp, [src], overwrite,
                   transformer_impl, check)
    return {"tensors": len(mappings), "format": fmt, "source": str(path)}
