"""Every source format, and every bad-record kind under each policy: message with file:line, nothing published."""
import dataclasses
import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import SourceConfig
from pipeline.data.sources import RecordSink, RecordStats, first_documents, plan_shards, read_shard
from pipeline.formats.indexed import IndexedReader

from conftest import DATA_ONLY, cli, cli_subprocess, fast_overrides

GOOD = [f"document number {i}: some words to tokenize." for i in range(20)]

# (kind, raw jsonl line, the message we expect to see)
BAD_RECORDS = [
    ("invalid_json", b'{"text": "unterminated\n', "invalid JSON"),
    ("missing_text", b'{"body": "no text field"}\n', "no 'text' field"),
    ("non_string_text", b'{"text": 42}\n', "'text' is int, not a string"),
    ("invalid_utf8", b'{"text": "bad \xff\xfe bytes"}\n', "invalid UTF-8"),
    ("empty_text", b'{"text": ""}\n', "empty 'text'"),
    ("not_an_object", b'["a", "list"]\n', "not a JSON object"),
]


def write_jsonl(path: Path, bad_line: bytes, at: int = 7) -> None:
    lines = [json.dumps({"text": t}).encode() + b"\n" for t in GOOD]
    lines.insert(at, bad_line)
    path.write_bytes(b"".join(lines))


def one_source(tmp_path: Path, corpus: Path, path: Path, *extra: str) -> list:
    """The fast test config with `web` replaced by `path`."""
    args = fast_overrides(corpus, tmp_path / "run", *extra)
    return [a if not a.startswith("data.sources.web.path=") else f"data.sources.web.path={path}" for a in args]


@pytest.mark.parametrize("kind,line,message", BAD_RECORDS, ids=[b[0] for b in BAD_RECORDS])
def test_bad_record_is_an_error_naming_file_and_line_and_nothing_is_published(corpus, tmp_path, kind, line, message):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, line, at=7)
    result = cli_subprocess("run", *one_source(tmp_path, corpus, path), *DATA_ONLY)
    assert result.returncode == 2
    assert f"{path}:8: {message}" in result.stderr, result.stderr
    assert "on_bad_record=skip" in result.stderr
    assert not (tmp_path / "run" / "tokenize").exists() and not (tmp_path / "run" / "mix").exists()


def test_skip_counts_and_quarantine_writes_every_bad_record(corpus, base_run, tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"text": t}).encode() + b"\n" for t in GOOD]
    for i, (_, bad, _) in enumerate(BAD_RECORDS):
        lines.insert(2 + 3 * i, bad)
    path.write_bytes(b"".join(lines))
    for policy in ("skip", "quarantine"):
        assert cli("run", *one_source(tmp_path / policy, corpus, path, f"data.sources.web.on_bad_record={policy}"),
                   "--only", "tokenizer,tokenize") == 0
        out = tmp_path / policy / "run" / "tokenize"
        metrics = json.loads((out / "MANIFEST.json").read_text())["metrics"]["sources"]["web"]
        assert metrics["documents"] == len(GOOD)
        assert metrics["skipped"] == {kind: 1 for kind, _, _ in BAD_RECORDS}
        rejects = out / "web.rejects.jsonl"
        if policy == "skip":
            assert not rejects.exists()
        else:
            rows = [json.loads(r) for r in rejects.read_text().splitlines()]
            assert [r["where"].rsplit(":", 1)[1] for r in rows] == [str(3 + 3 * i) for i in range(len(BAD_RECORDS))]
            assert "unterminated" in rows[0]["record"]
        assert len(IndexedReader(out / "web")) == len(GOOD)  # no empty document became a bare EOD


def test_formats_parquet_json_txt_gz_and_hf_streaming_read_the_same_documents(corpus, tmp_path, tokenizer_dir):
    """The same 20 documents through each reader give the same token stream."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in GOOD))
    with gzip.open(data / "docs.jsonl.gz", "wt") as f:
        f.write((data / "docs.jsonl").read_text())
    (data / "docs.json").write_text(json.dumps([{"text": t} for t in GOOD]))
    pq.write_table(pa.table({"content": GOOD}), data / "docs.parquet", row_group_size=3)
    (data / "docs.txt").write_text("\n".join(GOOD) + "\n")
    hf_dir = tmp_path / "hf_dataset"  # a local dataset directory, loaded by datasets' streaming code
    hf_dir.mkdir()
    pq.write_table(pa.table({"text": GOOD[:10]}), hf_dir / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"text": GOOD[10:]}), hf_dir / "train-00001-of-00002.parquet")
    variants = {
        "jsonl": [f"--input={data / 'docs.jsonl'}"],
        "jsonl_gz": [f"--input={data / 'docs.jsonl.gz'}"],
        "json": [f"--input={data / 'docs.json'}"],
        "parquet": [f"--input={data / 'docs.parquet'}", "--json-keys", "content", "--shard-bytes", "4096"],
    }
    streams = {}
    for name, args in variants.items():
        prefix = tmp_path / name
        assert cli("preprocess", *args, "--output-prefix", str(prefix), "--tokenizer", str(tokenizer_dir),
                   "--append-eod", "--workers", "2") == 0
        key = "content" if name == "parquet" else "text"
        streams[name] = np.asarray(IndexedReader(f"{prefix}_{key}_document").tokens)
    for name, extra in {"txt": ["data.sources.web.text_unit=line"], "hf": []}.items():
        path = data / "docs.txt" if name == "txt" else f"hf://{hf_dir}"
        assert cli("run", *one_source(tmp_path / name, corpus, path, *extra,
                                      f"tokenizer.pretrained={tokenizer_dir}"), "--only", "tokenizer,tokenize") == 0
        streams[name] = np.asarray(IndexedReader(tmp_path / name / "run" / "tokenize" / "web").tokens)
    for name, stream in streams.items():
        np.testing.assert_array_equal(stream, streams["jsonl"], err_msg=name)
    assert (streams["jsonl"] == 0).sum() == len(GOOD)  # one EOD (id 0) per document


@pytest.mark.parametrize("override,message", [
    ("data.sources.web.text_feld=x", "text_feld"),
    ("data.tokenize.workers=many", "data.tokenize.workers"),
    ("data.sources.web.on_bad_record=ignore", "on_bad_record"),
    ("+data.mix.weights.nosuch=0.5", "data.mix.weights: weights for unknown sources ['nosuch']"),
    ("data.mix.stopping=budget", "data.mix.total_tokens: stopping=budget needs"),
    ("data.mix.valid_fraction=1.5", "data.mix.valid_fraction: must be in [0, 1)"),
    ("data.sources.web.path=/nonexistent/*.jsonl", "data.sources.web.path: no files match"),
], ids=lambda v: v.split("=")[0] if "=" in v else "")
def test_bad_config_is_an_error_naming_the_key_before_any_stage_runs(corpus, tmp_path, override, message):
    result = cli_subprocess("run", *fast_overrides(corpus, tmp_path / "run"), override)
    assert result.returncode == 2
    assert message in result.stderr, result.stderr
    assert not (tmp_path / "run" / "tokenizer").exists()


def source(path: Path, **kw) -> SimpleNamespace:
    """A source as the stages see it (a plain copy of data.sources.<name>)."""
    return SimpleNamespace(**{**dataclasses.asdict(SourceConfig(path=str(path))), **kw})


def read_source(src: SimpleNamespace, shard_bytes: int = 1 << 20) -> list:
    sink = RecordSink("web", "error", RecordStats())
    return [t for shard in plan_shards("web", src, shard_bytes) for t in read_shard(shard, src, sink)]


@pytest.mark.parametrize("name,unit", [("docs.jsonl", "file"), ("docs.jsonl.gz", "file"), ("docs.json", "file"),
                                       ("docs.txt", "line"), ("docs.txt", "paragraph"), ("docs.txt", "file")])
def test_a_utf8_bom_before_the_first_record_is_dropped_as_utf8_sig_does(tmp_path, name, unit):
    path = tmp_path / name
    body = {"docs.jsonl": "".join(json.dumps({"text": t}) + "\n" for t in GOOD),
            "docs.json": json.dumps([{"text": t} for t in GOOD]),
            "docs.txt": ("\n\n" if unit == "paragraph" else "\n").join(GOOD) + "\n"}[name.removesuffix(".gz")]
    raw = body.encode("utf-8-sig")
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    texts = read_source(source(path, text_unit=unit))
    assert texts == ([body] if unit == "file" and name == "docs.txt" else GOOD)  # no "\ufeff" left on the first


def read_chars() -> int:
    return psutil.Process().io_counters().read_chars


def test_a_line_many_shards_long_is_read_once_not_once_per_shard(tmp_path):
    """Each shard after the one a long line starts in used to read the rest of that line to find its first
    line: 256 shards of 4 KiB over a 1 MB line read ~128 MB. Now each stops at its own end."""
    path = tmp_path / "long.jsonl"
    docs = ["short one", "x" * 1_000_000, "after it", "and the last"]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    before = read_chars()
    assert read_source(source(path), shard_bytes=4096) == docs
    assert read_chars() - before < 3 * path.stat().st_size


@pytest.mark.parametrize("ensure_ascii", [True, False], ids=["escaped", "utf8"])
def test_the_tokenizer_sample_reads_at_most_its_cap_of_a_huge_document(tmp_path, ensure_ascii):
    """The cap applies while reading: a prefix of the document, wherever the cut falls (inside an escape, a
    surrogate pair or a UTF-8 sequence), and no more than the cap is read of a 4 MB line. Before, the whole
    line was read and parsed (a 100 MB document cost the tokenizer stage 10 GB: bench/tokenizer_sample.py)."""
    text = "plain words, é and 😀 and \\ \" quotes\n" * 110_000
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"id": 1, "text": text}, ensure_ascii=ensure_ascii) + "\n"
                    + json.dumps({"text": "next"}) + "\n", encoding="utf-8")
    src = source(path)
    (shard,) = plan_shards("web", src, 1 << 62)
    for cap in range(65_536, 65_536 + 13):  # every back-off the cut may need
        before = read_chars()
        (sample,) = first_documents("web", src, [shard], max_docs=10, max_chars=cap)  # a cut fills the sample
        assert read_chars() - before < cap + (64 << 10)
        assert 0.4 * cap < len(sample) <= cap and text.startswith(sample), cap
        # read on past the cut, the rest of that line is skipped and the next record read whole
        cut, after = read_shard(shard, src, RecordSink("web", "error", RecordStats()), max_doc_bytes=cap)
        assert cut == sample and after == "next"
    assert list(first_documents("web", src, [shard], max_docs=10, max_chars=1 << 30)) == [text, "next"]
