"""Text sources: local jsonl / jsonl.gz / json / parquet / txt files and globs, or a streamed HF dataset.

A source is cut into shards that depend only on the files and `shard_bytes` (never on the worker
count): a byte range of a plain jsonl/txt file, a run of parquet row groups, a whole compressed or
json file, or one shard of a streamed HF dataset. `read_shard` yields each document's text in file
order; a bad record goes through the source's policy (error / skip / quarantine) with its file:line.
"""
from __future__ import annotations

import codecs
import glob
import gzip
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, TextIO, Tuple

import orjson

from pipeline.config import value_of
from pipeline.errors import DataError

log = logging.getLogger("pipeline")

HF_PREFIX = "hf://"
BOM = b"\xef\xbb\xbf"  # the UTF-8 byte order mark some editors put first in a file; dropped, as utf-8-sig does
SUFFIX_FORMATS = [(".jsonl.gz", "jsonl"), (".ndjson.gz", "jsonl"), (".jsonl", "jsonl"), (".ndjson", "jsonl"),
                  (".json.gz", "json"), (".json", "json"), (".parquet", "parquet"),
                  (".txt.gz", "txt"), (".txt", "txt"), (".md", "txt"), (".rst", "txt")]


@dataclass(frozen=True)
class Shard:
    source: str
    index: int
    path: str  # a file, or hf://<dataset>
    format: str  # jsonl | json | parquet | txt | hf
    start: int = 0  # bytes for plain jsonl/txt lines, row groups for parquet, shard number for hf
    end: int = -1  # exclusive; -1 = to the end

    def key(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class RecordStats:
    documents: int = 0
    chars: int = 0
    skipped: Dict[str, int] = field(default_factory=dict)  # reason kind -> count (skip and quarantine)
    blank_lines: int = 0
    cut: int = 0  # documents of which only read_shard's max_doc_bytes were read (a sample)


# ----------------------------------------------------------------------------- planning

def source_format(path: str, configured: Optional[str], key: str) -> str:
    if path.startswith(HF_PREFIX):
        return "hf"
    if configured:
        return configured
    for suffix, fmt in SUFFIX_FORMATS:
        if path.endswith(suffix):
            return fmt
    raise DataError(f"{key}.format: cannot tell the format of {path} from its suffix; "
                    f"set {key}.format to one of jsonl, json, parquet, txt")


def list_files(pattern: str, key: str) -> List[str]:
    """A file, a directory (every file under it with a known suffix) or a glob; sorted, so order is stable.
    `key` names the setting the pattern came from, for the error."""
    if os.path.isdir(pattern):
        files = [str(p) for p in Path(pattern).rglob("*")
                 if p.is_file() and any(str(p).endswith(s) for s, _ in SUFFIX_FORMATS)]
    else:
        files = [f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)]
    if not files:
        raise DataError(f"{key}: no files match {pattern!r}")
    return sorted(files)


def local_files(src: Any, key: str) -> List[str]:
    return [] if src.path.startswith(HF_PREFIX) else list_files(src.path, f"{key}.path")


def plan_shards(name: str, src: Any, shard_bytes: int) -> List[Shard]:
    key = f"data.sources.{name}"
    if src.path.startswith(HF_PREFIX):
        count = _hf_dataset(src).num_shards
        return [Shard(name, i, src.path, "hf", i, i + 1) for i in range(count)]
    shards: List[Shard] = []
    for path in local_files(src, key):
        fmt = source_format(path, src.format, key)
        splittable = (not path.endswith(".gz")
                      and (fmt == "jsonl" or (fmt == "txt" and value_of(src.text_unit) == "line")))
        if splittable:
            size = os.path.getsize(path)
            for start in range(0, max(size, 1), shard_bytes):
                shards.append(Shard(name, len(shards), path, fmt, start, min(start + shard_bytes, size)))
        elif fmt == "parquet":
            for first, last in _parquet_groups(path, shard_bytes):
                shards.append(Shard(name, len(shards), path, fmt, first, last))
        else:
            shards.append(Shard(name, len(shards), path, fmt))
    return shards


def _parquet_groups(path: str, shard_bytes: int) -> List[Tuple[int, int]]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    groups, first, size = [], 0, 0
    for g in range(meta.num_row_groups):
        size += meta.row_group(g).total_byte_size
        if size >= shard_bytes:
            groups.append((first, g + 1))
            first, size = g + 1, 0
    if first < meta.num_row_groups or not groups:
        groups.append((first, meta.num_row_groups))
    return groups


def _hf_dataset(src: Any):
    import datasets

    name = src.path[len(HF_PREFIX):]
    files = list(src.hf_data_files) if src.hf_data_files else None
    return datasets.load_dataset(name, src.hf_name, split=src.hf_split, streaming=True,
                                 revision=src.hf_revision, data_files=files)


# ----------------------------------------------------------------------------- reading

class RecordSink:
    """Applies a source's bad-record policy; quarantined records go to a rejects file."""

    def __init__(self, name: str, policy: str, stats: RecordStats, rejects: Optional[TextIO] = None):
        self.name, self.policy, self.stats, self.rejects = name, policy, stats, rejects

    def bad(self, where: str, reason: str, kind: str, raw: Any) -> None:
        if self.policy == "error":
            raise DataError(f"{where}: {reason}. Fix the record, or set "
                            f"data.sources.{self.name}.on_bad_record=skip (or quarantine) to drop such records")
        self.stats.skipped[kind] = self.stats.skipped.get(kind, 0) + 1
        if self.policy == "quarantine" and self.rejects is not None:
            if isinstance(raw, bytes):
                raw = raw.decode("utf-8", errors="replace")
            self.rejects.write(json.dumps({"where": where, "reason": reason, "record": raw},
                                          ensure_ascii=False) + "\n")


def read_shard(shard: Shard, src: Any, sink: RecordSink, max_doc_bytes: Optional[int] = None) -> Iterator[str]:
    """Yield the text of each good document of the shard, in order. With `max_doc_bytes` (a sample's), a
    jsonl/txt document is read no further than that many bytes and its text is a prefix of the document's;
    json, parquet and hf records are parsed whole."""
    reader = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet,
              "txt": _read_txt, "hf": _read_hf}[shard.format]
    texts = reader(shard, src, sink, max_doc_bytes) if shard.format in ("jsonl", "txt") else reader(shard, src, sink)
    for text in texts:
        sink.stats.documents += 1
        sink.stats.chars += len(text)
        yield text


def first_documents(name: str, src: Any, shards: List[Shard], max_docs: int, max_chars: int,
                    policy: Optional[str] = None) -> Iterator[str]:
    """The source's first documents, in shard order, until max_docs of them or max_chars in all, the last one
    cut to what is left of max_chars. A jsonl/txt document is read no further than max_chars bytes, so one
    100 MB document costs the sample max_chars, not the whole document. Under the source's own bad-record
    policy unless another is given."""
    stats = RecordStats()
    sink = RecordSink(name, policy or value_of(src.on_bad_record), stats)
    for shard in shards:
        for text in read_shard(shard, src, sink, max_doc_bytes=max_chars):
            over = stats.chars - max_chars
            yield text[:len(text) - over] if over > 0 else text
            # a cut document held max_chars bytes: the sample is full, and the rest of its line is never read
            if stats.documents >= max_docs or stats.chars >= max_chars or stats.cut:
                return


def _check_text(record: Any, field_name: str, where: str, raw: Any, sink: RecordSink) -> Optional[str]:
    if not isinstance(record, dict):
        sink.bad(where, f"not a JSON object but {type(record).__name__}", "not_an_object", raw)
        return None
    if field_name not in record or record[field_name] is None:
        sink.bad(where, f"no '{field_name}' field (fields: {sorted(record)[:10]})", "missing_text", raw)
        return None
    text = record[field_name]
    if not isinstance(text, str):
        sink.bad(where, f"'{field_name}' is {type(text).__name__}, not a string", "non_string_text", raw)
        return None
    if not text:
        sink.bad(where, f"empty '{field_name}'", "empty_text", raw)
        return None
    return text


def _open_lines(shard: Shard, limit: Optional[int] = None):
    """Binary line iterator over the shard's byte range: (line number function, line, cut) for the lines
    that *start* in [start, end), a BOM before the first line dropped. With `limit`, a longer line is cut
    to its first `limit` bytes (cut=True); the rest of it is skipped only if the next line is asked for."""
    gz = shard.path.endswith(".gz")
    with (gzip.open if gz else open)(shard.path, "rb") as f:
        pos, end = (0, sys.maxsize) if gz else (shard.start, shard.end)
        if pos > 0:
            f.seek(pos - 1)
            # finish the line that began in the previous shard; a line longer than this shard ends it
            pos = _skip_line(f, pos - 1, end)
        number = 1
        while pos < end:
            line = f.readline() if limit is None else f.readline(limit)
            if not line:
                break
            cut = limit is not None and len(line) == limit and not line.endswith(b"\n")
            where = (lambda n=number: n) if gz else (lambda p=pos: _line_number(shard.path, p))
            yield where, line.removeprefix(BOM) if pos == 0 else line, cut
            pos, number = pos + len(line), number + 1
            if cut:
                pos = _skip_line(f, pos, sys.maxsize)


def _skip_line(f, pos: int, stop: int) -> int:
    """Read on to the end of the current line, a bounded block at a time, but not past `stop`: the new
    position. So a line many shards long is read once by the shard it starts in, not once per shard."""
    while pos < stop:
        block = f.readline(min(1 << 20, stop - pos))
        pos += len(block)
        if not block or block.endswith(b"\n"):
            break
    return pos


def _line_number(path: str, offset: int) -> int:
    """1-based line number of the byte offset; only computed when an error needs it."""
    count, done = 1, 0
    with open(path, "rb") as f:
        while done < offset:
            block = f.read(min(1 << 24, offset - done))
            count += block.count(b"\n")
            done += len(block)
    return count


def _read_jsonl(shard: Shard, src: Any, sink: RecordSink, limit: Optional[int] = None) -> Iterator[str]:
    loads, field_name = orjson.loads, src.text_field
    for line_no, line, cut in _open_lines(shard, limit):
        try:
            record = loads(line)  # orjson also rejects invalid UTF-8 and lone surrogates
        except orjson.JSONDecodeError as e:
            if cut:  # only its first `limit` bytes were read
                sink.stats.cut += 1
                text = _cut_text(line, field_name)
                if text is None:
                    log.warning("%s:%s: a record longer than %d bytes whose '%s' is not in its first %d bytes; "
                                "left out of this sample", shard.path, line_no(), limit, field_name, limit)
                else:
                    yield text
                continue
            if not line.strip():
                sink.stats.blank_lines += 1
                continue
            where = f"{shard.path}:{line_no()}"
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as u:
                sink.bad(where, f"invalid UTF-8 at byte {u.start} of the line", "invalid_utf8", line)
                continue
            sink.bad(where, f"invalid JSON ({e})", "invalid_json", line)
            continue
        if not (type(record) is dict and type(text := record.get(field_name)) is str and text):
            text = _check_text(record, field_name, f"{shard.path}:{line_no()}", line, sink)  # the rare case
        del line, record  # a 100 MB document should not be held twice (raw bytes + str) while it encodes
        if text is not None:
            yield text


def _cut_text(head: bytes, field_name: str) -> Optional[str]:
    """The text of a jsonl record of which only the first bytes were read: close the string the cut fell in,
    backing off up to 12 bytes (out of an escape such as \\ud83d\\ude00, or a UTF-8 sequence). None when
    that does not parse (the cut was not in a string) or gives no text (the field comes later)."""
    for back in range(13):
        try:
            record = orjson.loads(head[:len(head) - back] + b'"}')
        except orjson.JSONDecodeError:
            continue
        text = record.get(field_name) if isinstance(record, dict) else None
        return text if isinstance(text, str) and text else None
    return None


def _read_json(shard: Shard, src: Any, sink: RecordSink) -> Iterator[str]:
    opener = gzip.open if shard.path.endswith(".gz") else open
    with opener(shard.path, "rb") as f:
        raw = f.read().removeprefix(BOM)
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise DataError(f"{shard.path}: invalid JSON ({e}); a .json source must hold one JSON array of "
                        f"records (use .jsonl for one record per line)") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{shard.path}: expected a JSON array of records, got {type(data).__name__}")
    for i, record in enumerate(data):
        text = _check_text(record, src.text_field, f"{shard.path}:record {i}", record, sink)
        if text is not None:
            yield text


def _read_parquet(shard: Shard, src: Any, sink: RecordSink) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(shard.path)
    if src.text_field not in pf.schema_arrow.names:
        raise DataError(f"{shard.path}: no column '{src.text_field}' (columns: {pf.schema_arrow.names}); "
                        f"set data.sources.{shard.source}.text_field")
    row = sum(pf.metadata.row_group(g).num_rows for g in range(shard.start))
    groups = list(range(shard.start, shard.end))
    for batch in pf.iter_batches(batch_size=4096, columns=[src.text_field], row_groups=groups):
        for value in batch.column(0).to_pylist():
            text = _check_text({src.text_field: value}, src.text_field, f"{shard.path}:row {row}", value, sink)
            row += 1
            if text is not None:
                yield text


def _read_txt(shard: Shard, src: Any, sink: RecordSink, limit: Optional[int] = None) -> Iterator[str]:
    unit = value_of(src.text_unit)
    if unit == "line":
        for line_no, line, cut in _open_lines(shard, limit):
            body = line.rstrip(b"\r\n")
            if not body:
                sink.stats.blank_lines += 1
                continue
            sink.stats.cut += cut
            text = _decode(body, f"{shard.path}:{line_no()}", sink, cut)
            if text is not None:
                yield text
        return
    opener = gzip.open if shard.path.endswith(".gz") else open
    with opener(shard.path, "rb") as f:
        raw = f.read() if limit is None else f.read(limit)
    cut = limit is not None and len(raw) == limit
    sink.stats.cut += cut
    raw = raw.removeprefix(BOM)
    if unit == "file":
        text = _decode(raw, shard.path, sink, cut) if raw else sink.bad(shard.path, "empty file", "empty_text", "")
        if text is not None:
            yield text
        return
    line, blocks = 1, raw.split(b"\n\n")  # paragraph: blank-line separated blocks
    for i, block in enumerate(blocks):
        if block.strip():
            text = _decode(block.strip(b"\n"), f"{shard.path}:{line}", sink, cut and i == len(blocks) - 1)
            if text is not None:
                yield text
        line += block.count(b"\n") + 2


def _decode(raw: bytes, where: str, sink: RecordSink, cut: bool = False) -> Optional[str]:
    try:
        # a cut may fall inside a character: the incremental decoder leaves out its first bytes
        return codecs.getincrementaldecoder("utf-8")().decode(raw) if cut else raw.decode("utf-8")
    except UnicodeDecodeError as e:
        sink.bad(where, f"invalid UTF-8 at byte {e.start}", "invalid_utf8", raw)
        return None


def _read_hf(shard: Shard, src: Any, sink: RecordSink) -> Iterator[str]:
    ds = _hf_dataset(src)
    part = ds.shard(num_shards=ds.num_shards, index=shard.start)
    for row, record in enumerate(part):
        where = f"{shard.path}[{src.hf_split}] shard {shard.start} row {row}"
        text = _check_text(record, src.text_field, where, {k: str(v)[:200] for k, v in record.items()}, sink)
        if text is not None:
            yield text
