"""The `tokenize` stage (and `pipeline preprocess`): sources -> one Megatron .bin/.idx per source.

Each source is cut into shards (pipeline/data/sources.py) that depend only on the input and
`shard_bytes`. Worker processes (or Ray tasks, `executor=ray`) encode shards into
`<scratch>/<source>/<shard>.bin` + `.len`, then write the shard's marker `<shard>.json` last; a
rerun after a kill redoes only shards without a marker. The merge concatenates shard bytes in shard
order, so the output is the same bytes for any worker count and any crash/resume history. A
source's token budget keeps whole documents, in order, while the running total stays within it.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, BinaryIO, Dict, List, Optional, Tuple

import numpy as np

from pipeline.config import value_of
from pipeline.data import encoders
from pipeline.data.executors import LocalPool, RayPool, single_threaded
from pipeline.data.sources import RecordSink, RecordStats, Shard, first_documents, local_files, plan_shards, read_shard
from pipeline.data.tokenizer import TOKENIZER_FILE, tokenizer_info
from pipeline.errors import DataError
from pipeline.files import write_json_atomic
from pipeline.formats.indexed import IndexedWriter, token_dtype
from pipeline.runner import SCRATCH, StageContext

log = logging.getLogger("pipeline")


@dataclass
class Job:
    """Everything a worker needs for one shard; plain data so it pickles to a spawned process."""

    shard: Shard
    source: SimpleNamespace
    tokenizer_json: str
    engine: str
    add_special_tokens: bool
    append_eod: bool
    eod_id: int
    vocab_len: int
    dtype: str
    batch_docs: int
    split_chars: int  # sys.maxsize when splitting is not exact for this tokenizer
    out_stem: str  # <scratch>/<source>/<shard index>: .bin, .len, .json (marker), .rejects.jsonl


# ----------------------------------------------------------------------------- worker side

_ENCODERS: Dict[Tuple[str, str, bool], Any] = {}


def _encoder(job: Job):
    key = (job.tokenizer_json, job.engine, job.add_special_tokens)
    if key not in _ENCODERS:
        _ENCODERS[key] = encoders.make_encoder(job.engine, Path(job.tokenizer_json), job.add_special_tokens)
    return _ENCODERS[key]


PIECES_PER_CALL = 8  # pieces of a huge document encoded per call: memory stays ~8 x split_chars
BATCH_CHARS = 8_000_000  # an encode call also ends at this many characters, whatever batch_docs says


class ShardEncoder:
    """Encodes documents into a shard's .bin/.len: ordinary ones in batches, a huge one piece by piece."""

    def __init__(self, job: Job, fbin: BinaryIO, flen: BinaryIO):
        self.job, self.fbin, self.flen = job, fbin, flen
        self.encoder = _encoder(job)
        self.dtype = np.dtype(job.dtype)
        self.tokens = self.hard_splits = 0
        self.encode_seconds = 0.0

    def _encode(self, texts: List[str]) -> Tuple[np.ndarray, np.ndarray]:
        t0 = time.perf_counter()
        ids, lengths = self.encoder.encode(texts)
        self.encode_seconds += time.perf_counter() - t0
        if ids.size and (int(ids.max()) >= self.job.vocab_len or int(ids.min()) < 0):
            raise DataError(f"{self.job.shard.path}: token id {int(ids.max())} is outside the tokenizer's "
                            f"{self.job.vocab_len} entries; the tokenizer files are inconsistent")
        return ids, lengths

    def _write(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        self.fbin.write(ids.astype(self.dtype, copy=False).tobytes())
        if lengths.size:
            self.flen.write(lengths.astype(np.int32).tobytes())
            self.tokens += int(lengths.sum())

    def add_batch(self, texts: List[str]) -> None:
        ids, lengths = self._encode(texts)
        if self.job.append_eod:  # one EOD after each document, in a single vectorised insert
            ids = np.insert(ids, np.cumsum(lengths), self.job.eod_id)
            lengths = lengths + 1
        self._write(ids, lengths)

    def add_huge(self, text: str) -> None:
        """Pieces cut at pre-token boundaries (exact for this tokenizer, checked up front), encoded a few
        at a time and written as they come: one document, and no more memory than its own text."""
        cuts = encoders.split_points(text, self.job.split_chars)
        self.hard_splits += encoders.hard_cuts(text, cuts)
        bounds = [0] + cuts + [len(text)]
        length = 0
        for g in range(0, len(bounds) - 1, PIECES_PER_CALL):
            group = [text[a:b] for a, b in zip(bounds[g:g + PIECES_PER_CALL], bounds[g + 1:g + 1 + PIECES_PER_CALL])]
            ids, _ = self._encode(group)
            self._write(ids, np.zeros(0))
            length += ids.size
        if self.job.append_eod:
            self._write(np.array([self.job.eod_id]), np.zeros(0))
            length += 1
        self._write(np.zeros(0), np.array([length]))


def encode_shard(job: Job) -> Dict[str, Any]:
    """Encode one shard to its scratch files; the marker (.json) is written last."""
    stem = Path(job.out_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stats = RecordStats()
    policy = value_of(job.source.on_bad_record)
    t0 = time.perf_counter()
    with open(f"{stem}.bin.tmp", "wb") as fbin, open(f"{stem}.len.tmp", "wb") as flen, \
            open(f"{stem}.rejects.jsonl", "w") if policy == "quarantine" else nullcontext() as rejects:
        out = ShardEncoder(job, fbin, flen)
        batch: List[str] = []
        chars = 0
        for text in read_shard(job.shard, job.source, RecordSink(job.shard.source, policy, stats, rejects)):
            if len(text) > job.split_chars:
                if batch:
                    out.add_batch(batch)
                    batch, chars = [], 0
                out.add_huge(text)
                continue
            batch.append(text)
            chars += len(text)
            if len(batch) >= job.batch_docs or chars >= BATCH_CHARS:
                out.add_batch(batch)
                batch, chars = [], 0
        if batch:
            out.add_batch(batch)
    os.replace(f"{stem}.bin.tmp", f"{stem}.bin")
    os.replace(f"{stem}.len.tmp", f"{stem}.len")
    marker = {"shard": job.shard.key(), "documents": stats.documents, "tokens": out.tokens, "chars": stats.chars,
              "skipped": stats.skipped, "blank_lines": stats.blank_lines, "hard_splits": out.hard_splits,
              "seconds": round(time.perf_counter() - t0, 3), "encode_seconds": round(out.encode_seconds, 3)}
    write_json_atomic(Path(f"{stem}.json"), marker)
    return marker


def _ray_encode_shard(job: Job) -> Dict[str, Any]:
    single_threaded()  # each Ray worker process: one encoder thread per task, as a local worker has
    return encode_shard(job)


# ----------------------------------------------------------------------------- driver side

def _marker(job: Job) -> Optional[Dict[str, Any]]:
    path = Path(f"{job.out_stem}.json")
    try:
        marker = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return marker if marker.get("shard") == job.shard.key() else None


class Progress:
    """tqdm on a terminal, a log line every 10 s otherwise."""

    def __init__(self, total: int, desc: str):
        self.start, self.last, self.docs, self.tokens = time.time(), 0.0, 0, 0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="shard")
        self.total, self.done, self.desc = total, 0, desc

    def update(self, marker: Dict[str, Any]) -> None:
        self.done += 1
        self.docs += marker["documents"]
        self.tokens += marker["tokens"]
        elapsed = max(time.time() - self.start, 1e-9)
        rates = f"{self.docs / elapsed:,.0f} docs/s, {self.tokens / elapsed:,.0f} tokens/s"
        if self.bar is not None:
            self.bar.set_postfix_str(rates, refresh=False)
            self.bar.update(1)
        elif time.time() - self.last >= 10 or self.done == self.total:
            self.last = time.time()
            log.info("%s: %d/%d shards, %s", self.desc, self.done, self.total, rates)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.total = self.done  # shards past a token budget never run: end the bar at 100%
            self.bar.close()
        elif self.done and self.done < self.total:  # shards past a token budget never ran: say where it ended
            elapsed = max(time.time() - self.start, 1e-9)
            log.info("%s: %d/%d shards (the rest past token budgets), %s docs/s, %s tokens/s", self.desc,
                     self.done, self.total, f"{self.docs / elapsed:,.0f}", f"{self.tokens / elapsed:,.0f}")


def _run_jobs(jobs_by_source: Dict[str, List[Job]], budgets: Dict[str, Optional[int]], workers: int,
              executor: str = "local", ray_address: str = "local",
              timing: Optional[Dict[str, float]] = None) -> Dict[str, List[Dict[str, Any]]]:
    """Run shard jobs in order, in this process (local, 1 worker), on `workers` processes (local) or as
    Ray tasks (ray); markers per source in shard order.

    A source with a token budget stops getting new shards once its finished prefix covers the budget,
    so a 10B-token budget over a 1T-token source tokenizes about 10B tokens, not 1T."""
    done: Dict[str, Dict[int, Dict[str, Any]]] = {s: {} for s in jobs_by_source}
    queue = [job for jobs in jobs_by_source.values() for job in jobs]
    total = len(queue)
    progress = Progress(total, "tokenize")

    def covered(source: str) -> bool:
        budget = budgets.get(source)
        if budget is None:
            return False
        tokens = 0
        for i in range(len(jobs_by_source[source])):
            if i not in done[source]:
                return False
            tokens += done[source][i]["tokens"]
            if tokens >= budget:
                return True
        return False

    def finished(job: Job, marker: Dict[str, Any]) -> None:
        done[job.shard.source][job.shard.index] = marker
        progress.update(marker)

    pending: List[Job] = []
    for job in queue:  # shards finished before a crash are reused as they are
        marker = _marker(job)
        if marker is not None:
            finished(job, marker)
        else:
            pending.append(job)
    try:
        if executor == "local" and workers == 1:
            for job in pending:
                if not covered(job.shard.source):
                    finished(job, encode_shard(job))
        elif pending:
            t_start = time.perf_counter()
            pool = (RayPool(ray_address, workers, _ray_encode_shard, "tokenize") if executor == "ray"
                    else LocalPool(workers, encode_shard))
            if timing is not None:  # Ray's start (or connection) is a fixed cost per run, apart from throughput
                timing["executor_start"] = round(time.perf_counter() - t_start, 3)
            in_flight: Dict[Any, Job] = {}
            try:
                it = iter(pending)
                while True:
                    while len(in_flight) < 2 * pool.slots:  # a queue per worker, never the whole corpus
                        job = next(it, None)
                        if job is None:
                            break
                        if not covered(job.shard.source):
                            in_flight[pool.submit(job)] = job
                    if not in_flight:
                        break
                    for handle in pool.wait(in_flight):
                        job = in_flight.pop(handle)
                        finished(job, pool.result(handle, f"tokenize shard {job.shard.key()} of {job.shard.path}"))
            finally:
                pool.close(in_flight)
    finally:
        progress.close()
    prefixes = {}
    for s, jobs in jobs_by_source.items():
        # Only the contiguous run of finished shards counts: with a budget, a shard finished before a
        # crash can sit past one that is no longer needed, and it must not be merged out of place.
        count = next((i for i in range(len(jobs)) if i not in done[s]), len(jobs))
        assert budgets.get(s) is not None or count == len(jobs), f"source {s}: shard {count} never ran"
        prefixes[s] = [done[s][i] for i in range(count)]
    return prefixes


def _merge(source: str, jobs: List[Job], markers: List[Dict[str, Any]], prefix: Path, dtype: np.dtype,
           budget: Optional[int]) -> Dict[str, Any]:
    """Concatenate shard files in shard order into prefix.bin/.idx, cutting at the token budget."""
    writer = IndexedWriter(prefix, dtype)
    rejects = Path(f"{prefix}.rejects.jsonl")
    skipped: Dict[str, int] = {}
    try:
        with open(rejects, "w") as rej_out:
            for job, marker in zip(jobs, markers):
                lengths = np.fromfile(f"{job.out_stem}.len", dtype=np.int32)
                if budget is not None:
                    room = budget - writer.tokens
                    keep = int(np.searchsorted(np.cumsum(lengths, dtype=np.int64), room, side="right"))
                    lengths = lengths[:keep]
                writer.add_raw(Path(f"{job.out_stem}.bin"), lengths)
                for kind, n in marker["skipped"].items():
                    skipped[kind] = skipped.get(kind, 0) + n
                rej = Path(f"{job.out_stem}.rejects.jsonl")
                if rej.is_file():
                    rej_out.write(rej.read_text())
                if budget is not None and len(lengths) < marker["documents"]:
                    break
        documents, tokens = writer.finish()
    except BaseException:
        writer.abort()
        raise
    if rejects.stat().st_size == 0:
        rejects.unlink()
    return {"documents": documents, "tokens": tokens, "skipped": skipped,
            "shards": len(markers), "hard_splits": sum(m["hard_splits"] for m in markers),
            "blank_lines": sum(m["blank_lines"] for m in markers)}


def tokenize_sources(sources: Dict[str, Any], tokenizer_dir: Path, prefixes: Dict[str, Path], scratch: Path,
                     opts: Any) -> Dict[str, Any]:
    """Tokenize each source into prefixes[source].bin/.idx. `opts` is a TokenizeConfig (or look-alike)."""
    t_start = time.perf_counter()
    info = tokenizer_info(tokenizer_dir)
    dtype = token_dtype(info["vocab_len"])
    tokenizer_json = tokenizer_dir / TOKENIZER_FILE
    plain = {name: _plain(src) for name, src in sources.items()}
    shards = {name: plan_shards(name, src, opts.shard_bytes) for name, src in plain.items()}
    # The engine check's sample: each source's first documents (bad ones skipped here; the workers
    # apply the real policy), at most 512 KiB of each, long documents cut to their first 100k chars.
    sample = [text[:100_000] for name, src in plain.items()
              for text in first_documents(name, src, shards[name], opts.verify_docs, 512 * 1024, policy="skip")]
    engine, verification = encoders.choose_engine(value_of(opts.engine), tokenizer_json,
                                                  opts.add_special_tokens, sample)
    # with the real add_special_tokens: a tokenizer that adds BOS/EOS per call must not be split
    split_exact = encoders.splitting_is_exact(encoders.make_encoder("hf", tokenizer_json, opts.add_special_tokens),
                                              sample)
    log.info("tokenize: engine=%s, dtype=%s, %d shards, %d workers", engine, dtype.name,
             sum(map(len, shards.values())), opts.workers)
    jobs = {
        name: [Job(shard, plain[name], str(tokenizer_json), engine, opts.add_special_tokens, opts.append_eod,
                   info["eod_id"], info["vocab_len"], dtype.name, opts.batch_docs,
                   opts.split_chars if split_exact else sys.maxsize,
                   str(scratch / name / f"{shard.index:06d}"))
               for shard in src_shards]
        for name, src_shards in shards.items()
    }
    budgets = {name: src.max_tokens for name, src in plain.items()}
    t_shards = time.perf_counter()
    started: Dict[str, float] = {}
    markers = _run_jobs(jobs, budgets, opts.workers, getattr(opts, "executor", "local"),
                        getattr(opts, "ray_address", "local"), started)
    t_merge = time.perf_counter()
    per_source = {name: _merge(name, jobs[name], markers[name], prefixes[name], dtype, budgets[name])
                  for name in sources}
    t_end = time.perf_counter()
    seconds = t_end - t_start
    tokens = sum(s["tokens"] for s in per_source.values())
    all_markers = [m for ms in markers.values() for m in ms]
    # Where the time goes: setup (plan + engine check), shards (of which workers spent encode_share
    # inside the encoder; the rest is reading, JSON, EOD insertion and writing), merge.
    timing = {"setup": round(t_shards - t_start, 3), "shards": round(t_merge - t_shards, 3),
              "merge": round(t_end - t_merge, 3), "executor_start": started.get("executor_start", 0.0),
              "encode_share_of_worker_time": round(sum(m.get("encode_seconds", 0) for m in all_markers)
                                                   / max(sum(m["seconds"] for m in all_markers), 1e-9), 3)}
    return {"engine": engine, "engine_check": verification, "dtype": dtype.name, "eod_id": info["eod_id"],
            "vocab_len": info["vocab_len"], "split_long_documents": split_exact, "sources": per_source,
            "tokens": tokens, "seconds": round(seconds, 3), "tokens_per_second": round(tokens / max(seconds, 1e-9)),
            "timing": timing}


def _plain(src: Any) -> SimpleNamespace:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(src):
        src = OmegaConf.to_container(src, resolve=True, enum_to_str=True)
    return SimpleNamespace(**src) if isinstance(src, dict) else src


# ----------------------------------------------------------------------------- the stage

def run(ctx: StageContext) -> Dict[str, Any]:
    sources = ctx.cfg.data.sources
    prefixes = {name: ctx.work_dir / name for name in sources}
    return tokenize_sources(sources, ctx.inputs["tokenizer"], prefixes, ctx.scratch, ctx.cfg.data.tokenize)


def external_inputs(cfg) -> List[str]:
    return [f for name, src in cfg.data.sources.items() for f in local_files(src, f"data.sources.{name}")]


def shards_done(work_dir: Path) -> List[str]:
    """The finished shards (marker written) in a partial tokenize dir: the work a rerun would keep."""
    return sorted(str(p.relative_to(work_dir)) for p in (work_dir / SCRATCH).glob("*/*.json"))
