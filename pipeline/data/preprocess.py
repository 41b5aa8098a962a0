"""`pipeline preprocess`: a drop-in for Megatron-LM's `tools/preprocess_data.py` with an HF tokenizer.

Same arguments (`--input --output-prefix --json-keys --append-eod --workers`, and Megatron's
`--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR` spelling), same output names
(`<prefix>_<key>_document.bin/.idx`), same ids, document boundaries and dtype; it runs on the tokenize
stage's machinery, so it is parallel, resumable after a kill (shards kept in `<prefix>.scratch/`),
and publishes the .bin/.idx only when complete. Outputs of an earlier run are replaced only with
`--overwrite` (pipeline/destination.py's rule, applied to each file it writes).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

from pipeline import destination
from pipeline.config import TokenizeConfig
from pipeline.data.sources import list_files
from pipeline.data.tokenize import tokenize_sources
from pipeline.errors import DataError
from pipeline.files import canonical_json, remove, sha256_file
from pipeline.runner import input_identities

log = logging.getLogger("pipeline")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="jsonl / jsonl.gz / json / parquet / txt file, directory or glob")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.bin/.idx")
    p.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer", required=True,
                   help="HF tokenizer directory (or hub name)")
    p.add_argument("--tokenizer-type", default="HuggingFaceTokenizer",
                   help="accepted for Megatron compatibility; only HuggingFaceTokenizer is supported")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="fields to tokenize, one output per key")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--executor", default="local", choices=["local", "ray"], help="worker processes here, or Ray tasks")
    p.add_argument("--ray-address", default="local", help="--executor ray: local (embedded), auto, host:port, ray://")
    p.add_argument("--append-eod", action="store_true", help="EOD token after every document")
    p.add_argument("--engine", default="auto", choices=["auto", "hf", "fastokens", "gigatoken"])
    p.add_argument("--on-bad-record", default="error", choices=["error", "skip", "quarantine"])
    p.add_argument("--shard-bytes", type=int, default=TokenizeConfig.shard_bytes)
    p.add_argument("--split-sentences", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--partitions", type=int, default=1, help="accepted and ignored: sharding is automatic")
    p.add_argument("--log-interval", type=int, default=0, help="accepted and ignored")
    p.add_argument("--keep-newlines", action="store_true", help="accepted and ignored (sentence splitting only)")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run (refused without)")


def preprocess(args: argparse.Namespace) -> None:
    if args.split_sentences:
        raise DataError("--split-sentences is not supported: documents are tokenized whole (as without the flag)")
    if args.tokenizer_type != "HuggingFaceTokenizer":
        raise DataError(f"--tokenizer-type {args.tokenizer_type}: only HuggingFaceTokenizer is supported")
    prefix = Path(args.output_prefix)
    scratch = Path(f"{prefix}.scratch")
    inputs = list_files(args.input, "--input")
    _claim_outputs(args, prefix, scratch, inputs)
    tokenizer_dir = _tokenizer_dir(args.tokenizer, scratch)
    opts = TokenizeConfig(workers=args.workers, engine=args.engine, shard_bytes=args.shard_bytes,
                          append_eod=args.append_eod, executor=args.executor, ray_address=args.ray_address)
    sources = {key: SimpleNamespace(path=args.input, text_field=key, format=None, text_unit="file",
                                    hf_name=None, hf_split="train", hf_revision=None, hf_data_files=None,
                                    max_tokens=None, on_bad_record=args.on_bad_record)
               for key in args.json_keys}
    # Shards left by an interrupted run are reused only if input, tokenizer and options are the same.
    key = hashlib.sha256(canonical_json({
        "inputs": input_identities(inputs),
        "tokenizer": sha256_file(tokenizer_dir / "tokenizer.json"),
        "opts": {**vars(opts), "engine": str(args.engine)}, "keys": args.json_keys,
        "policy": args.on_bad_record}).encode()).hexdigest()
    key_file = scratch / KEY
    if key_file.read_text() != key:  # shards of another input, tokenizer or options
        shutil.rmtree(scratch / "shards", ignore_errors=True)
    (scratch / "shards").mkdir(exist_ok=True)
    key_file.write_text(key)
    prefixes = {k: Path(f"{prefix}_{k}_document") for k in args.json_keys}
    metrics = tokenize_sources(sources, tokenizer_dir, prefixes, scratch / "shards", opts)
    shutil.rmtree(scratch)
    for k, m in metrics["sources"].items():
        log.info("%s: %d documents, %d tokens (%s), skipped %s", prefixes[k], m["documents"], m["tokens"],
                 metrics["dtype"], m["skipped"] or "none")
    log.info("engine %s, %.1fs, %s tokens/s", metrics["engine"], metrics["seconds"],
             f"{metrics['tokens_per_second']:,}")
    Path(f"{prefix}.preprocess.json").write_text(json.dumps(metrics, indent=2))


KEY = "KEY"  # in <prefix>.scratch/ from its creation: what the shards were made from, and that a run made it


def _claim_outputs(args: argparse.Namespace, prefix: Path, scratch: Path, inputs: list) -> None:
    """Before anything is written: every file this run writes may be written (none is, or is inside, an
    input; an existing one only with --overwrite), and <prefix>.scratch/ is this command's or absent."""
    outputs = [*(Path(f"{prefix}_{k}_document{ext}") for k in args.json_keys
                 for ext in (".bin", ".idx", ".rejects.jsonl")), Path(f"{prefix}.preprocess.json")]
    sources = [*inputs, *([args.input] if os.path.isdir(args.input) else [])]
    for out in outputs:
        destination.check(out, sources, args.overwrite, "--output-prefix", "--overwrite")
    for out in outputs:
        if out.is_symlink():  # --overwrite: replace the link, never write through it
            out.unlink()
    ours = scratch.is_dir() and not scratch.is_symlink() and (scratch / KEY).is_file()
    if not ours:  # absent, empty, or not made by preprocess: only --overwrite removes it
        destination.check(scratch, sources, args.overwrite, "--output-prefix", "--overwrite")
        if os.path.lexists(scratch):
            remove(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / KEY).touch()


def _tokenizer_dir(name: str, scratch: Path) -> Path:
    path = Path(name)
    if (path / "tokenizer.json").is_file():
        return path
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise DataError(f"--tokenizer {name}: not a directory with tokenizer.json, "
                        f"and cannot be loaded: {e}") from None
    out = scratch / "tokenizer"
    tok.save_pretrained(out)
    return out
