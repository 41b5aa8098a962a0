"""The `tokenizer` stage: a pretrained HF tokenizer, or a byte-level BPE trained on a sample of the sources.

Output is an HF tokenizer directory plus, for BPE models, `vocab.json` + `merges.txt`, which Megatron's
GPT2BPETokenizer reads. The HF files are in the portable form (`write_portable`) that transformers 4.44+
and 5.x both load; every writer of a tokenizer dir (this stage, the HF backend's train/hf, conversion to
HF) goes through `copy_tokenizer`, which also sets `model_max_length` where the trained context is known.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from pipeline.data.sources import first_documents, local_files, plan_shards
from pipeline.errors import DataError
from pipeline.runner import StageContext

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
MAP_FILE = "special_tokens_map.json"  # transformers 5 stopped writing it; 4.x loaders and serving stacks read it
INFO_FILE = "pipeline_tokenizer.json"  # {eod_id, vocab_len}: what later stages need, without transformers
# What a tokenizer dir may hold, for copies (pipeline_tokenizer.json and the manifest are ours, not the model's)
TOKENIZER_FILES = (TOKENIZER_FILE, CONFIG_FILE, MAP_FILE, "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "added_tokens.json", "chat_template.jinja")
# The class both transformers 4.x and 5.x know (5 writes TokenizersBackend, which 4.x cannot import). It
# encodes exactly as tokenizer.json says, as the tokenize stage did, where a model's own class may add steps.
PORTABLE_CLASS = "PreTrainedTokenizerFast"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
V5_ONLY_KEYS = ("backend",)  # 4.x would keep it as an unknown init argument and write it back
NO_LIMIT = 10 ** 29  # transformers' "no limit" (VERY_LARGE_INTEGER, ~1e30): the same as no model_max_length
GPT2_EOD = "<|endoftext|>"  # the EOD of Megatron's GPT2BPETokenizer


def sample_texts(sources: Dict[str, Any], docs_per_source: int, bytes_per_source: int) -> Iterator[str]:
    """The BPE training sample: the first documents of each source (whole files as one shard each). The byte
    cap applies while reading: of a 100 MB document, only the first bytes_per_source are read."""
    for name, src in sources.items():
        yield from first_documents(name, src, plan_shards(name, src, shard_bytes=1 << 62),
                                   docs_per_source, bytes_per_source)


def byte_level(model):
    """A tokenizer over a BPE model with GPT-2's byte-level pre-tokenizer, decoder and post-processor."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors

    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_bpe(texts: Iterator[str], vocab_size: int, min_frequency: int, special_tokens: List[str]):
    """Byte-level BPE as GPT-2 has it: every byte is in the alphabet, so nothing is ever unknown."""
    from tokenizers import models, pre_tokenizers, trainers

    tok = byte_level(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def run(ctx: StageContext) -> Dict[str, Any]:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg, out = ctx.cfg.tokenizer, ctx.work_dir
    metrics: Dict[str, Any] = {}
    if cfg.pretrained:
        try:
            hf = AutoTokenizer.from_pretrained(cfg.pretrained, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as e:
            raise DataError(f"tokenizer.pretrained: cannot load {cfg.pretrained!r}: {e}") from None
        if not getattr(hf, "is_fast", False):
            raise DataError(f"tokenizer.pretrained: {cfg.pretrained!r} has no fast (tokenizer.json) version")
        if hf.eos_token is None:
            if cfg.eod_token not in hf.get_vocab():
                raise DataError(f"tokenizer.eod_token: {cfg.eod_token!r} is not in {cfg.pretrained!r} and it has "
                                f"no eos_token; set tokenizer.eod_token to a token it has")
            hf.eos_token = cfg.eod_token
        metrics["source"] = cfg.pretrained
    else:
        special = [cfg.eod_token] + [t for t in cfg.special_tokens if t != cfg.eod_token]
        texts = sample_texts(ctx.cfg.data.sources, cfg.sample_docs_per_source, cfg.sample_bytes_per_source)
        tok = train_bpe(texts, cfg.vocab_size, cfg.min_frequency, special)
        # GPT-2's convention: one <|endoftext|> serves as bos, eos and unk.
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=cfg.eod_token, bos_token=cfg.eod_token,
                                     unk_token=cfg.eod_token, additional_special_tokens=special[1:] or None)
        metrics["source"] = f"byte-level BPE trained on {sorted(ctx.cfg.data.sources)}"
    hf.save_pretrained(out)
    write_portable(out)  # the trained context is not known here: train/hf and export/hf set model_max_length
    backend = hf.backend_tokenizer
    if json.loads(backend.to_str())["model"]["type"] == "BPE":
        backend.model.save(str(out))  # vocab.json + merges.txt for Megatron's GPT2BPETokenizer
    info = {"eod_id": hf.eos_token_id, "eod_token": hf.eos_token, "vocab_len": len(hf)}
    (out / INFO_FILE).write_text(json.dumps(info, indent=2))
    return {**metrics, **info}


def portable_config(config: Dict[str, Any], model_max_length: Optional[int] = None) -> Dict[str, Any]:
    """tokenizer_config.json as transformers 4.44+ and 5.x both load it: a class both know, the special
    tokens beyond bos/eos/... as 4.x's `additional_special_tokens` (5's list-form `extra_special_tokens`
    is refused by 4.x), a pad token (the EOD) where there is none, and `model_max_length` when given."""
    out = {k: v for k, v in config.items() if k not in V5_ONLY_KEYS}
    out["tokenizer_class"] = PORTABLE_CLASS
    extra = out.pop("extra_special_tokens", None)
    if isinstance(extra, dict):  # named extra tokens: the form 4.5x and 5 both read
        out["extra_special_tokens"] = extra
    elif extra:
        known = out.get("additional_special_tokens") or []
        out["additional_special_tokens"] = known + [t for t in extra if t not in known]
    if out.get("pad_token") is None and out.get("eos_token") is not None:
        out["pad_token"] = out["eos_token"]
    if model_max_length:
        out["model_max_length"] = int(model_max_length)
    elif out.get("model_max_length", 0) >= NO_LIMIT:
        del out["model_max_length"]
    return out


def portable_merges(tokenizer_json: Path) -> None:
    """BPE merges as "a b" strings, the one form tokenizers < 0.20 (which transformers 4.44 pins) reads;
    tokenizers >= 0.20 writes [a, b] pairs and reads both. Kept as pairs if a token holds a space (byte-level
    BPE's never do: a space is Ġ), which the string form cannot say."""
    tok = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    merges = tok.get("model", {}).get("merges") or []
    if merges and all(isinstance(m, list) and " " not in "".join(m) for m in merges):
        tok["model"]["merges"] = [" ".join(m) for m in merges]
        tokenizer_json.write_text(json.dumps(tok, indent=2, ensure_ascii=False), encoding="utf-8")


def write_portable(directory: Path, model_max_length: Optional[int] = None) -> None:
    """Rewrite a tokenizer dir's tokenizer_config.json (`portable_config`), special_tokens_map.json from it,
    and tokenizer.json's merges (`portable_merges`)."""
    if (Path(directory) / TOKENIZER_FILE).is_file():
        portable_merges(Path(directory) / TOKENIZER_FILE)
    path = Path(directory) / CONFIG_FILE
    config = portable_config(json.loads(path.read_text()), model_max_length)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    mapping = {k: config[k] for k in SPECIAL_TOKENS if config.get(k) is not None}
    if config.get("additional_special_tokens"):
        mapping["additional_special_tokens"] = config["additional_special_tokens"]
    (Path(directory) / MAP_FILE).write_text(json.dumps(mapping, indent=2, ensure_ascii=False) + "\n")


def copy_tokenizer(src: Optional[Path], dst: Path, model_max_length: Optional[int] = None) -> List[str]:
    """Copy a tokenizer dir's files (TOKENIZER_FILES) into dst, in the portable form, with model_max_length (the
    trained seq_len) where given. Returns the names copied; nothing when src is None."""
    copied = [name for name in TOKENIZER_FILES if src and (Path(src) / name).is_file()]
    for name in copied:
        shutil.copy2(Path(src) / name, Path(dst) / name)
    if CONFIG_FILE in copied:
        write_portable(dst, model_max_length)
        copied += [] if MAP_FILE in copied else [MAP_FILE]
    return copied


def gpt2_bpe_dir(vocab_file: str, merge_file: str, out: Path) -> Path:
    """A tokenizer dir for Megatron's GPT2BPETokenizer (`--vocab-file --merge-file`): GPT-2's byte-level BPE
    over vocab.json + merges.txt, with <|endoftext|> as its one special token, EOD and pad."""
    from tokenizers import models

    try:
        tok = byte_level(models.BPE.from_file(vocab_file, merge_file))
    except Exception as e:  # tokenizers raises its own Exception type for a bad file
        raise DataError(f"--vocab-file {vocab_file} / --merge-file {merge_file}: not a GPT-2 vocab.json and "
                        f"merges.txt pair: {e}") from None
    if tok.token_to_id(GPT2_EOD) is None:
        raise DataError(f"--vocab-file {vocab_file}: has no {GPT2_EOD}, GPT2BPETokenizer's end-of-document token")
    tok.add_special_tokens([GPT2_EOD])  # as GPT-2's own tokenizer: the literal text is the token, as one id
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / TOKENIZER_FILE))
    (out / CONFIG_FILE).write_text(json.dumps({"eos_token": GPT2_EOD, "bos_token": GPT2_EOD, "unk_token": GPT2_EOD}))
    write_portable(out)
    return out


def tokenizer_info(directory: Path) -> Dict[str, Any]:
    """EOD id and vocabulary length of a tokenizer dir (ours, or any HF one, e.g. for `preprocess`).

    Read from the files, not through transformers: its import alone costs seconds per run."""
    directory = Path(directory)
    info_path = directory / INFO_FILE
    if info_path.is_file():
        return json.loads(info_path.read_text())
    from tokenizers import Tokenizer

    eos = None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (directory / name).is_file():
            eos = json.loads((directory / name).read_text()).get("eos_token") or eos
    eos = eos.get("content") if isinstance(eos, dict) else eos
    tok = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
    if eos is None or tok.token_to_id(eos) is None:
        raise DataError(f"{directory}: the tokenizer has no eos_token in tokenizer_config.json, so there is no "
                        f"end-of-document id; set one (as `pipeline run` does from tokenizer.eod_token)")
    return {"eod_id": tok.token_to_id(eos), "eod_token": eos, "vocab_len": tok.get_vocab_size(with_added_tokens=True)}


def external_inputs(cfg) -> List[str]:
    """Files outside the run dir that decide the output: the sources sampled, or a local pretrained dir."""
    t = cfg.tokenizer
    if t.pretrained:
        path = Path(t.pretrained)
        return sorted(str(p) for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    return [f for name, src in cfg.data.sources.items() for f in local_files(src, f"data.sources.{name}")]
