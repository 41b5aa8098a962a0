"""The `tokenizer` stage: a pretrained HF tokenizer, or a byte-level BPE trained on a sample of the sources.

Output is an HF tokenizer directory (`AutoTokenizer.from_pretrained` loads it) plus, for BPE models,
`vocab.json` + `merges.txt`, which Megatron's GPT2BPETokenizer reads.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterator, List

from pipeline.data.sources import first_documents, local_files, plan_shards
from pipeline.errors import DataError
from pipeline.runner import StageContext

TOKENIZER_FILE = "tokenizer.json"
INFO_FILE = "pipeline_tokenizer.json"  # {eod_id, vocab_len}: what later stages need, without transformers


def sample_texts(sources: Dict[str, Any], docs_per_source: int, bytes_per_source: int) -> Iterator[str]:
    """The BPE training sample: the first documents of each source (whole files as one shard each). The byte
    cap applies while reading: of a 100 MB document, only the first bytes_per_source are read."""
    for name, src in sources.items():
        yield from first_documents(name, src, plan_shards(name, src, shard_bytes=1 << 62),
                                   docs_per_source, bytes_per_source)


def train_bpe(texts: Iterator[str], vocab_size: int, min_frequency: int, special_tokens: List[str]):
    """Byte-level BPE as GPT-2 has it: every byte is in the alphabet, so nothing is ever unknown."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
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
    if not (out / "special_tokens_map.json").exists():  # transformers 5 stopped writing it; 4.x loaders read it
        (out / "special_tokens_map.json").write_text(json.dumps(
            {k: v for k, v in hf.special_tokens_map.items() if v}, indent=2, ensure_ascii=False))
    backend = hf.backend_tokenizer
    if json.loads(backend.to_str())["model"]["type"] == "BPE":
        backend.model.save(str(out))  # vocab.json + merges.txt for Megatron's GPT2BPETokenizer
    info = {"eod_id": hf.eos_token_id, "eod_token": hf.eos_token, "vocab_len": len(hf)}
    (out / INFO_FILE).write_text(json.dumps(info, indent=2))
    return {**metrics, **info}


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
