"""The `mix` stage: token-exact weighted interleaving of whole documents into train/valid .bin/.idx.

by=tokens (default), the deficit rule: the next document always comes from the source furthest below
its target share, deficit_s = w_s * T - t_s (T tokens so far, t_s of them from s). Since a source
is only drawn while its deficit is >= 0, it overshoots by at most its last document; and since the
deficits sum to zero, it undershoots by at most one document of each other source. So the achieved
shares are within one document per source of the weights, whatever the document lengths.

by=documents: each document's source is drawn at random with probability w_s (seeded), as HF's
`interleave_datasets(probabilities=...)` does; shares then hold in documents, not tokens.

The validation split is mixed first, with the same rule, from the head of each source; training
continues from there and, when it repeats a source (all_exhausted / budget), it cycles over that
source's training documents only, so valid and train never share a document.

Per-source validation: beside valid.bin/.idx the stage writes valid/<source>.bin/.idx, exactly the
documents of that source that went into valid.bin (in its order: valid.bin is their disjoint union), and
valid.sources.bin/.idx, valid.bin's shape with every token replaced by the index of its document's source
(in VALID_SOURCES order of mix_report.json). Both backends read that stream beside valid.bin, block for
block, to attribute each evaluated token to its source.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from pipeline.config import value_of
from pipeline.errors import DataError
from pipeline.files import read_json
from pipeline.formats.indexed import IndexedReader, IndexedWriter, check_token_ids
from pipeline.runner import MANIFEST, StageContext

FLUSH = 1 << 16  # picks buffered before their tokens are copied out
BY_SOURCE = "valid"  # valid/<source>.bin/.idx: one source's share of the validation split
SOURCE_IDS = "valid.sources"  # valid.bin's shape, each token its document's source index
VALID_SOURCES = "valid_sources"  # mix_report.json: the sources in index order


def source_prefix(mix_dir: Path, source: str) -> Path:
    """One source's share of the mix's validation split."""
    return Path(mix_dir) / BY_SOURCE / source


def valid_sources(mix_dir: Path) -> List[str]:
    """The sources the valid.sources stream indexes; [] for a mix written before it existed."""
    return (read_json(Path(mix_dir) / "mix_report.json") or {}).get(VALID_SOURCES, [])


@dataclass
class Cursor:
    """Where a source is read from: documents [first, end) in order; `next` is the next one to take."""

    reader: IndexedReader
    first: int = 0
    next: int = 0
    repeats: int = 0  # times it wrapped around to `first` to be read again

    @property
    def exhausted(self) -> bool:
        return self.next >= len(self.reader)


@dataclass
class SplitResult:
    tokens: int = 0
    documents: int = 0
    per_source: Dict[str, Dict[str, int]] = field(default_factory=dict)
    max_token_id: int = -1


class SplitWriter:
    """Copies picked documents into a .bin/.idx, a run of consecutive documents at a time."""

    def __init__(self, prefix: Path, dtype: np.dtype, names: List[str], readers: Dict[str, IndexedReader],
                 by_source: bool = False):
        self.writer = IndexedWriter(prefix, dtype)
        self.names, self.readers = names, readers
        # the validation split also goes to one file per source and to the source-id stream (see above)
        self.by_source = [IndexedWriter(source_prefix(prefix.parent, n), dtype) for n in names] if by_source else []
        self.ids = IndexedWriter(prefix.parent / SOURCE_IDS, dtype) if by_source else None
        self.picks: List[tuple] = []
        self.max_ids = [-1] * len(names)  # per source: the largest id copied, checked against the vocabulary

    def add(self, source: int, doc: int) -> None:
        self.picks.append((source, doc))
        if len(self.picks) >= FLUSH:
            self.flush()

    def flush(self) -> None:
        i = 0
        while i < len(self.picks):
            s, first = self.picks[i]
            j = i + 1
            while j < len(self.picks) and self.picks[j] == (s, first + (j - i)):
                j += 1
            reader = self.readers[self.names[s]]
            start = int(reader.pointers[first]) // reader.dtype.itemsize
            lengths = np.asarray(reader.lengths[first:first + (j - i)])
            tokens = reader.tokens[start:start + int(lengths.sum())]
            if tokens.size:  # pages being copied anyway
                self.max_ids[s] = max(self.max_ids[s], int(tokens.max()))
            self.writer.add(tokens, lengths)
            if self.ids is not None:
                self.by_source[s].add(tokens, lengths)
                self.ids.add(np.full(tokens.size, s, dtype=self.writer.dtype), lengths)
            i = j
        self.picks = []

    def finish(self) -> None:
        self.flush()
        for writer in [self.writer, *self.by_source, *([self.ids] if self.ids else [])]:
            writer.finish()


def mix_split(cursors: List[Cursor], weights: np.ndarray, out: SplitWriter, by: str, stopping: str,
              budget: Optional[int], rng: np.random.Generator, names: List[str]) -> SplitResult:
    """Draw documents until the stopping rule says stop; returns what each source contributed."""
    n = len(cursors)
    produced = np.zeros(n, dtype=np.int64)
    docs = np.zeros(n, dtype=np.int64)
    ran_out = np.array([c.exhausted for c in cursors])
    repeats_before = [c.repeats for c in cursors]
    total = 0
    while budget is None or total < budget:
        if stopping == "all_exhausted" and ran_out.all():
            break
        if by == "tokens":
            s = int(np.argmax(weights * total - produced))  # ties: the first source in config order
        else:
            s = int(rng.choice(n, p=weights))
        c = cursors[s]
        if c.exhausted:
            if stopping == "first_exhausted" or c.first >= len(c.reader):
                break
            c.next, c.repeats = c.first, c.repeats + 1  # upsample: read this source again
        doc, c.next = c.next, c.next + 1
        ran_out[s] |= c.exhausted
        length = int(c.reader.lengths[doc])
        out.add(s, doc)
        produced[s] += length
        docs[s] += 1
        total += length
    out.finish()
    result = SplitResult(tokens=total, documents=int(docs.sum()), max_token_id=max(out.max_ids))
    for s, name in enumerate(names):
        result.per_source[name] = {"tokens": int(produced[s]), "documents": int(docs[s]),
                                   "repeats": cursors[s].repeats - repeats_before[s], "max_token_id": out.max_ids[s]}
    return result


def _report(result: SplitResult, weights: np.ndarray, names: List[str],
            readers: Dict[str, IndexedReader]) -> Dict[str, Any]:
    sources = {}
    for s, name in enumerate(names):
        got = result.per_source[name]
        target = float(weights[s]) * result.tokens
        sources[name] = {
            "target_share": round(float(weights[s]), 6),
            "achieved_share": round(got["tokens"] / result.tokens, 6) if result.tokens else 0.0,
            "tokens": got["tokens"],
            "target_tokens": round(target),
            "deviation_tokens": round(got["tokens"] - target),
            "documents": got["documents"],
            "repeats": got["repeats"],
            "max_document_tokens": int(np.max(readers[name].lengths)) if len(readers[name]) else 0,
            "max_token_id": got["max_token_id"],
        }
    return {"tokens": result.tokens, "documents": result.documents, "max_token_id": result.max_token_id,
            "sources": sources}


def mix(inputs: Dict[str, Path], out_dir: Path, cfg: Any, vocab_size: Optional[int] = None) -> Dict[str, Any]:
    """Mix the sources' .bin/.idx (opening them checks their structure) into out_dir/train and valid. With
    vocab_size, a copied token id >= vocab_size is a DataError naming the source file and the token."""
    weights_cfg = {k: float(v) for k, v in cfg.weights.items() if float(v) > 0}
    names = list(weights_cfg)
    weights = np.array([weights_cfg[n] for n in names], dtype=np.float64)
    weights /= weights.sum()
    readers = {n: IndexedReader(inputs[n]) for n in names}
    for n, r in readers.items():
        if r.num_tokens == 0:
            raise DataError(f"data.mix.weights.{n}: source {n} has no tokens (were all its records skipped?); "
                             f"fix the source or set its weight to 0")
    dtypes = {r.dtype for r in readers.values()}
    if len(dtypes) > 1:
        raise DataError(f"the sources' .bin files hold different token dtypes "
                        f"({', '.join(f'{inputs[n]}.bin: {r.dtype}' for n, r in readers.items())}); "
                        f"they were not made with one tokenizer: rebuild them (`pipeline run --force tokenize`)")
    dtype = dtypes.pop()
    by, stopping = value_of(cfg.by), value_of(cfg.stopping)
    available = np.array([readers[n].num_tokens for n in names], dtype=np.float64)
    # The total the stopping rule will reach, to size the validation split before mixing.
    expected_total = {"first_exhausted": float(np.min(available / weights)),
                      "all_exhausted": float(np.max(available / weights)),
                      "budget": float(cfg.total_tokens or 0)}[stopping]
    valid_budget = int(cfg.valid_tokens if cfg.valid_tokens is not None
                       else round(cfg.valid_fraction * expected_total))
    rng = np.random.default_rng(cfg.seed)
    cursors = [Cursor(readers[n]) for n in names]
    results = {}
    valid_out = SplitWriter(out_dir / "valid", dtype, names, readers, by_source=True)
    if valid_budget > 0:
        results["valid"] = mix_split(cursors, weights, valid_out, by, "first_exhausted", valid_budget, rng, names)
        if results["valid"].tokens < valid_budget:
            raise DataError(f"data.mix: the sources hold only {results['valid'].tokens} tokens for a "
                             f"{valid_budget}-token validation split; lower data.mix.valid_fraction/valid_tokens")
    else:
        valid_out.finish()
        results["valid"] = SplitResult(per_source={n: {"tokens": 0, "documents": 0, "repeats": 0, "max_token_id": -1}
                                                   for n in names})
    for c in cursors:  # training cycles over what validation did not take
        c.first = c.next
    train_budget = None if stopping != "budget" else int(cfg.total_tokens) - results["valid"].tokens
    train_out = SplitWriter(out_dir / "train", dtype, names, readers)
    results["train"] = mix_split(cursors, weights, train_out, by, stopping, train_budget, rng, names)
    for name in names:
        if vocab_size is not None and max(r.per_source[name]["max_token_id"] for r in results.values()) >= vocab_size:
            check_token_ids(readers[name], vocab_size)  # raises, naming the file, the token and its document
    report = {
        "by": by, "stopping": stopping, "seed": int(cfg.seed),
        "weights": {n: round(float(w), 6) for n, w in zip(names, weights)},
        "excluded_sources": sorted(set(cfg.weights) - set(names)),
        "dtype": np.dtype(dtype).name,
        VALID_SOURCES: names,
        "available": {n: {"tokens": readers[n].num_tokens, "documents": len(readers[n])} for n in names},
        "splits": {split: _report(res, weights, names, readers) for split, res in results.items()},
    }
    (out_dir / "mix_report.json").write_text(json.dumps(report, indent=2))
    return report


def run(ctx: StageContext) -> Dict[str, Any]:
    tokenized = ctx.inputs["tokenize"]
    inputs = {name: tokenized / name for name in ctx.cfg.data.mix.weights}
    vocab_size = ((read_json(tokenized / MANIFEST) or {}).get("metrics") or {}).get("vocab_len")
    report = mix(inputs, ctx.work_dir, ctx.cfg.data.mix, vocab_size)
    return {split: {"tokens": r["tokens"], "documents": r["documents"], "max_token_id": r["max_token_id"],
                    "shares": {n: s["achieved_share"] for n, s in r["sources"].items()}}
            for split, r in report["splits"].items()}
