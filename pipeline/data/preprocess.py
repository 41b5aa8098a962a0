"""`pipeline preprocess`: a drop-in for Megatron-LM's `tools/preprocess_data.py`.

Same arguments: every flag of preprocess_data.py and the tokenizer flags a GPT recipe passes
(`--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR`, or `GPT2BPETokenizer --vocab-file
--merge-file`); those that change nothing here are accepted and say why in `--help` (NO_EFFECT). Same
output names (`<prefix>_<key>_document.bin/.idx`), same ids, document boundaries and dtype; it runs on
the tokenize stage's machinery, so it is parallel, resumable after a kill (shards kept in
`<prefix>.scratch/`), and publishes the .bin/.idx only when complete. Outputs of an earlier run are
replaced only with `--overwrite` (pipeline/destination.py's rule, applied to each file it writes).
Errors from that machinery name this command's flags, not the config keys of `pipeline run` (FLAG_TERMS).
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
from pipeline.data.tokenizer import gpt2_bpe_dir
from pipeline.errors import ConfigError, DataError
from pipeline.files import canonical_json, remove, sha256_file
from pipeline.runner import input_identities

log = logging.getLogger("pipeline")


TOKENIZER_TYPES = ("HuggingFaceTokenizer", "GPT2BPETokenizer")
# Megatron-LM flags that change nothing here: (flags, argparse settings, why), shown in --help.
NO_EFFECT = (
    (("--lang",), dict(default="english"), "NLTK sentence splitting only (--split-sentences is not supported)"),
    (("--keep-newlines",), dict(action="store_true"), "sentence splitting only"),
    (("--partitions",), dict(type=int, default=1), "sharding is automatic (--shard-bytes)"),
    (("--keep-sequential-samples",), dict(action="store_true"), "documents are always written in input order"),
    (("--log-interval",), dict(type=int, default=1000), "progress is shown per shard"),
    (("--find-optimal-num-workers",), dict(action="store_true"), "the worker count is --workers"),
    (("--workers-to-check",), dict(type=int, nargs="+"), "with --find-optimal-num-workers only"),
    (("--max-documents",), dict(type=int), "with --find-optimal-num-workers only"),
    (("--vocab-size",), dict(type=int), "NullTokenizer and TikTokenizer only"),
    (("--vocab-extra-ids",), dict(type=int, default=0), "preprocess_data.py sets it to 0 itself"),
    (("--padded-vocab-size",), dict(type=int), "the model's embedding size, not the data's"),
    (("--make-vocab-size-divisible-by",), dict(type=int), "the model's embedding size, not the data's"),
    (("--tokenizer-hf-no-use-fast",), dict(action="store_true"),
     "ids always come from tokenizer.json (the fast tokenizer)"),
    (("--chat-template",), dict(), "documents are tokenized as plain text, not as chats"),
)
# The config keys the tokenize machinery names in its errors ({key}: a --json-keys key), in this command's terms.
FLAG_TERMS = (
    ("set data.sources.{key}.on_bad_record=skip (or quarantine)", "pass --on-bad-record skip (or quarantine)"),
    ("set data.sources.{key}.format to one of jsonl, json, parquet, txt",
     "give it one of the suffixes .jsonl, .jsonl.gz, .json, .parquet, .txt"),
    ("data.sources.{key}.format", "--input"),
    ("data.sources.{key}.path", "--input"),
    ("set data.sources.{key}.text_field", "name another field with --json-keys"),
    ("data.tokenize.engine=", "--engine "),
    ("use engine=auto or engine=hf", "use --engine auto or --engine hf"),
    ("set one (as `pipeline run` does from tokenizer.eod_token)", "set eos_token in its tokenizer_config.json"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="jsonl / jsonl.gz / json / parquet / txt file, directory or glob")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.bin/.idx")
    p.add_argument("--tokenizer-type", default="HuggingFaceTokenizer", choices=TOKENIZER_TYPES,
                   help="HuggingFaceTokenizer (--tokenizer-model) or GPT2BPETokenizer (--vocab-file, --merge-file)")
    p.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer",
                   help="HuggingFaceTokenizer: an HF tokenizer directory (or hub name)")
    p.add_argument("--vocab-file", help="GPT2BPETokenizer: GPT-2's vocab.json")
    p.add_argument("--merge-file", help="GPT2BPETokenizer: GPT-2's merges.txt")
    p.add_argument("--trust-remote-code", action="store_true", help="for a hub tokenizer with its own code")
    p.add_argument("--tokenizer-hf-no-include-special-tokens", action="store_true",
                   help="no special tokens added per document (BOS/EOS of the tokenizer's post-processor)")
    p.add_argument("--tokenizer-special-tokens", nargs="+", help="refused: add the tokens to the tokenizer dir")
    p.add_argument("--use-gigatoken", action="store_true", help="as --engine gigatoken")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="fields to tokenize, one output per key")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--executor", default="local", choices=["local", "ray"], help="worker processes here, or Ray tasks")
    p.add_argument("--ray-address", default="local", help="--executor ray: local (embedded), auto, host:port, ray://")
    p.add_argument("--append-eod", action="store_true", help="EOD token after every document")
    p.add_argument("--engine", default="auto", choices=["auto", "hf", "fastokens", "gigatoken"])
    p.add_argument("--on-bad-record", default="error", choices=["error", "skip", "quarantine"])
    p.add_argument("--shard-bytes", type=int, default=TokenizeConfig.shard_bytes)
    p.add_argument("--split-sentences", action="store_true", help="refused: documents are tokenized whole")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run (refused without)")
    for flags, settings, why in NO_EFFECT:
        p.add_argument(*flags, **settings, help=f"accepted, no effect: {why}")


def _check_flags(args: argparse.Namespace) -> None:
    """Flag combinations refused before anything is read or written."""
    if args.split_sentences:
        raise ConfigError("--split-sentences is not supported: documents are tokenized whole (as without the flag)")
    if args.tokenizer_special_tokens:
        raise ConfigError("--tokenizer-special-tokens is not supported: add the tokens to the tokenizer "
                          "(its tokenizer.json) and pass that directory as --tokenizer-model")
    gpt2 = args.tokenizer_type == "GPT2BPETokenizer"
    if gpt2 and not (args.vocab_file and args.merge_file):
        raise ConfigError("--tokenizer-type GPT2BPETokenizer needs --vocab-file (vocab.json) and --merge-file "
                          "(merges.txt); they are never downloaded")
    if gpt2 and args.tokenizer:
        raise ConfigError("--tokenizer-model is for --tokenizer-type HuggingFaceTokenizer; GPT2BPETokenizer "
                          "reads --vocab-file and --merge-file")
    if not gpt2 and not args.tokenizer:
        raise ConfigError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model (an HF tokenizer dir)")
    if not gpt2 and (args.vocab_file or args.merge_file):
        raise ConfigError("--vocab-file/--merge-file are for --tokenizer-type GPT2BPETokenizer; with "
                          "HuggingFaceTokenizer the tokenizer dir's tokenizer.json decides")
    if args.use_gigatoken and args.engine not in ("auto", "gigatoken"):
        raise ConfigError(f"--use-gigatoken and --engine {args.engine} disagree; pass one of them")


def in_flag_terms(error: Exception, keys: list) -> Exception:
    """The same error, its config keys (FLAG_TERMS) replaced by this command's flags."""
    message = str(error)
    for key in keys:
        for ours, flag in FLAG_TERMS:
            message = message.replace(ours.format(key=key), flag)
    return type(error)(message)


def preprocess(args: argparse.Namespace) -> None:
    _check_flags(args)
    prefix = Path(args.output_prefix)
    scratch = Path(f"{prefix}.scratch")
    inputs = list_files(args.input, "--input")
    _claim_outputs(args, prefix, scratch, inputs)
    tokenizer_dir = (gpt2_bpe_dir(args.vocab_file, args.merge_file, scratch / "tokenizer")
                     if args.tokenizer_type == "GPT2BPETokenizer" else _tokenizer_dir(args, scratch))
    engine = "gigatoken" if args.use_gigatoken else args.engine
    opts = TokenizeConfig(workers=args.workers, engine=engine, shard_bytes=args.shard_bytes,
                          append_eod=args.append_eod, executor=args.executor, ray_address=args.ray_address,
                          add_special_tokens=not args.tokenizer_hf_no_include_special_tokens)
    sources = {key: SimpleNamespace(path=args.input, text_field=key, format=None, text_unit="file",
                                    hf_name=None, hf_split="train", hf_revision=None, hf_data_files=None,
                                    max_tokens=None, on_bad_record=args.on_bad_record)
               for key in args.json_keys}
    # Shards left by an interrupted run are reused only if input, tokenizer and options are the same.
    key = hashlib.sha256(canonical_json({
        "inputs": input_identities(inputs),
        "tokenizer": sha256_file(tokenizer_dir / "tokenizer.json"),
        "opts": {**vars(opts), "engine": str(engine)}, "keys": args.json_keys,
        "policy": args.on_bad_record}).encode()).hexdigest()
    key_file = scratch / KEY
    if key_file.read_text() != key:  # shards of another input, tokenizer or options
        shutil.rmtree(scratch / "shards", ignore_errors=True)
    (scratch / "shards").mkdir(exist_ok=True)
    key_file.write_text(key)
    prefixes = {k: Path(f"{prefix}_{k}_document") for k in args.json_keys}
    try:
        metrics = tokenize_sources(sources, tokenizer_dir, prefixes, scratch / "shards", opts)
    except (ConfigError, DataError) as e:
        raise in_flag_terms(e, args.json_keys) from None
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


def _tokenizer_dir(args: argparse.Namespace, scratch: Path) -> Path:
    name = args.tokenizer
    path = Path(name)
    if (path / "tokenizer.json").is_file():
        return path
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:
        raise DataError(f"--tokenizer-model {name}: not a directory with tokenizer.json, "
                        f"and cannot be loaded: {e}") from None
    out = scratch / "tokenizer"
    tok.save_pretrained(out)
    return out
