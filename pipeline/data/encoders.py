"""Encoding engines. HF `tokenizers` is the reference; a faster engine is used only where it gives HF's ids.

Every engine turns a batch of texts into (flat ids, per-document lengths) as numpy arrays, because
that is what the .bin writer wants: building per-document Python lists and flattening them again
costs as much as the fast engines' whole encode.

`auto` encodes a verification sample of the actual input with HF and with the fast engines, fastest
first (FAST_ENGINES), and keeps the first whose ids are identical on every sampled document; the
check and its result are reported in the tokenize manifest. No fast engine passes -> HF, with a log line.
"""
from __future__ import annotations

import logging
import time
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np

from pipeline.errors import ConfigError

log = logging.getLogger("pipeline")

Batch = Tuple[np.ndarray, np.ndarray]  # (flat ids int64/uint32, lengths int64)


class HFEncoder:
    name = "hf"

    def __init__(self, tokenizer_json: Path, add_special_tokens: bool):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(tokenizer_json))
        self.add_special_tokens = add_special_tokens

    def encode(self, texts: Sequence[str]) -> Batch:
        # encode_batch_fast skips offset tracking; the ids are the same as encode_batch's.
        encodings = self.tok.encode_batch_fast(list(texts), add_special_tokens=self.add_special_tokens)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        # chain.from_iterable flattens in C: 1.5x faster than a nested generator (3% of encode time)
        flat = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.int64, count=int(lengths.sum()))
        return flat, lengths


class FastokensEncoder:
    name = "fastokens"

    def __init__(self, tokenizer_json: Path, add_special_tokens: bool):
        import fastokens

        self.tok = fastokens.Tokenizer.from_file(str(tokenizer_json))
        self.add_special_tokens = add_special_tokens

    def encode(self, texts: Sequence[str]) -> Batch:
        ids, offsets = self.tok.encode_batch_flat(list(texts), add_special_tokens=self.add_special_tokens)
        offsets = np.frombuffer(offsets, dtype=np.uint64).astype(np.int64)
        return (np.frombuffer(ids, dtype=np.uint32),
                np.diff(offsets) if offsets.size > 1 else np.zeros(len(texts), np.int64))


class GigatokenEncoder:
    name = "gigatoken"

    def __init__(self, tokenizer_json: Path, add_special_tokens: bool):
        import gigatoken

        self.tok = gigatoken.Tokenizer(str(tokenizer_json))
        self.add_special_tokens = add_special_tokens

    def encode(self, texts: Sequence[str]) -> Batch:
        import awkward as ak

        result = self.tok.encode_batch(list(texts), parallel=False)  # one core per worker process
        return np.asarray(ak.flatten(result), dtype=np.int64), np.asarray(ak.num(result), dtype=np.int64)


ENGINES: Dict[str, Callable[[Path, bool], Any]] = {
    "hf": HFEncoder,
    "fastokens": FastokensEncoder,
    "gigatoken": GigatokenEncoder,
}
# Fastest first, as bench/tokenize.py measures them end to end on this kind of machine (fastokens
# ahead: gigatoken returns awkward arrays, whose import alone costs ~1.3 s per process).
FAST_ENGINES = ("fastokens", "gigatoken")


def make_encoder(engine: str, tokenizer_json: Path, add_special_tokens: bool):
    return ENGINES[engine](tokenizer_json, add_special_tokens)


# ----------------------------------------------------------------------------- verification

def first_mismatch(ref: Batch, got: Batch) -> str | None:
    ref_ids, ref_len = ref
    got_ids, got_len = got
    if ref_len.shape != got_len.shape:
        return f"{got_len.size} documents back for {ref_len.size}"
    bad = np.nonzero(ref_len != got_len)[0]
    if bad.size == 0 and np.array_equal(ref_ids, got_ids.astype(ref_ids.dtype)):
        return None
    starts = np.concatenate([[0], np.cumsum(ref_len)])
    for d in range(ref_len.size):
        a = ref_ids[starts[d]:starts[d + 1]]
        b = got_ids[starts[d]:starts[d] + got_len[d]] if bad.size == 0 else None
        if ref_len[d] != got_len[d] or not np.array_equal(a, b):
            return (f"document {d} of the sample differs ({int(ref_len[d])} HF tokens, "
                    f"{int(got_len[d])} from the engine)")
    return "ids differ"


def choose_engine(requested: str, tokenizer_json: Path, add_special_tokens: bool,
                  sample: List[str]) -> Tuple[str, Dict[str, Any]]:
    """Pick the engine and return (name, report). Raises if an explicitly requested engine is wrong."""
    if requested == "hf":
        return "hf", {"chosen": "hf"}
    reference = HFEncoder(tokenizer_json, add_special_tokens)
    t0 = time.perf_counter()
    ref = reference.encode(sample)
    report: Dict[str, Any] = {"sample_docs": len(sample), "sample_chars": sum(map(len, sample)),
                              "hf": {"seconds": round(time.perf_counter() - t0, 4)}}
    candidates = FAST_ENGINES if requested == "auto" else (requested,)
    best = "hf"
    for name in candidates:
        if best != "hf":
            report[name] = {"usable": None, "why": f"not tried: {best} comes first and passed"}
            continue
        try:
            encoder = make_encoder(name, tokenizer_json, add_special_tokens)
            t0 = time.perf_counter()
            got = encoder.encode(sample)
            seconds = time.perf_counter() - t0
        except Exception as e:  # not installed, or cannot read this tokenizer
            report[name] = {"usable": False, "why": f"{type(e).__name__}: {e}"[:300]}
            continue
        mismatch = first_mismatch(ref, got)
        report[name] = {"usable": mismatch is None, "identical_ids": mismatch is None,
                        "seconds": round(seconds, 4), **({"why": mismatch} if mismatch else {})}
        if mismatch is None:
            best = name
    if requested not in ("auto", "hf") and best != requested:
        raise ConfigError(f"data.tokenize.engine={requested} cannot be used: {report[requested].get('why')}; "
                         f"use engine=auto or engine=hf")
    if best == "hf" and requested == "auto":
        log.info("engine=auto: no fast engine gave HF's ids on the sample, using hf (%s)",
                 {k: v.get("why") for k, v in report.items() if isinstance(v, dict) and "why" in v})
    report["chosen"] = best
    return best, report


# ----------------------------------------------------------------------------- huge documents

def split_points(text: str, max_chars: int) -> List[int]:
    """Cut positions so no piece is longer than max_chars, at places where byte-level BPE's
    pre-tokenizer splits anyway, so the pieces' ids concatenate to the whole text's ids (checked per
    tokenizer by `splitting_is_exact`): right after a newline with non-space on both sides ("x\n|Y"),
    else right before a single space between non-spaces ("x| y"). A window with neither is cut hard,
    which the caller counts."""
    cuts, start, n = [], 0, len(text)
    while n - start > max_chars:
        lo, hi = start + max_chars // 2, start + max_chars
        cut = _rfind_between(text, "\n", lo, hi)
        cut = cut + 1 if cut > 0 else _rfind_between(text, " ", lo, hi)
        cut = cut if cut > 0 else hi
        cuts.append(cut)
        start = cut
    return cuts


def _rfind_between(text: str, char: str, lo: int, hi: int) -> int:
    """Last index of `char` in [lo, hi) with a non-space character on both sides; -1 if none."""
    pos = hi
    while (pos := text.rfind(char, lo, pos)) > 0:
        if not text[pos - 1].isspace() and not text[pos + 1:pos + 2].isspace() and pos + 1 < len(text):
            return pos
    return -1


def hard_cuts(text: str, cuts: List[int]) -> int:
    """How many cuts fell at neither safe boundary (after "x\\n", before " y")."""
    return sum(1 for c in cuts if text[c - 1] != "\n" and text[c] != " ")


def pieces(text: str, max_chars: int) -> Tuple[List[str], int]:
    """The text cut at `split_points`, and how many of the cuts were hard (not at a safe boundary)."""
    cuts = split_points(text, max_chars)
    hard = hard_cuts(text, cuts)
    bounds = [0] + cuts + [len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])], hard


def splitting_is_exact(encoder: Any, sample: List[str], piece_chars: int = 1024) -> bool:
    """Does encoding line-start pieces give the same ids as the whole text, for this tokenizer?"""
    text = "".join(sample)[:64 * piece_chars]
    if "\n" not in text:
        return False
    whole, _ = encoder.encode([text])
    cut, hard = pieces(text, piece_chars)
    parts, _ = encoder.encode(cut)
    return hard == 0 and np.array_equal(whole, parts)
