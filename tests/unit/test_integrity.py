"""Corrupt data artifacts are never consumed: structure of .bin/.idx, manifests' sizes and sha256 before a
stage runs, token ids against the vocabulary; `pipeline verify-data` and `pipeline status --verify`.

Each case damages a copy of the session's real run (tests/conftest.py base_run) and runs the real CLI
in-process: the stage that would read the damage stops with exit 2 before anything is published."""
import json
import logging
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import DataError
from pipeline.formats.indexed import HEADER_BYTES, IndexedReader, IndexedWriter

from conftest import cli, copy_data_stages, fast_overrides

MIX = ("--only", "mix", "--force", "mix")
TRAIN = ("--only", "import,train")


@pytest.fixture
def run_copy(base_run, tmp_path):
    return copy_data_stages(base_run, tmp_path / "run")


def args(corpus: Path, run_dir: Path) -> list:
    return fast_overrides(corpus, run_dir, "train.tracker=none")


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "MANIFEST.json").read_text())


def forget_sha256(run_dir: Path, stage: str, rel: str) -> None:
    """Leave the output's size only in its manifest, as for a file over 64 MiB: then the readers' own checks
    are what stands between a damaged file and the stage that reads it."""
    man = manifest(run_dir, stage)
    del man["outputs"][rel]["sha256"]
    (run_dir / stage / "MANIFEST.json").write_text(json.dumps(man))


def flip_length(idx: Path, sequence: int) -> None:
    """Change one sequence length of a .idx in place: same size, lengths and pointers now disagree."""
    raw = bytearray(idx.read_bytes())
    at = HEADER_BYTES + 4 * sequence
    (length,) = struct.unpack_from("<i", raw, at)
    struct.pack_into("<i", raw, at, length + 3)
    idx.write_bytes(bytes(raw))


def set_token(path: Path, index: int, value: int) -> None:
    tokens = np.memmap(path, np.uint16, "r+")
    tokens[index] = value
    tokens.flush()
    del tokens


def test_a_changed_length_in_a_tokenize_idx_is_never_mixed(corpus, run_copy, capsys):
    idx = run_copy / "tokenize" / "web.idx"
    mixed = (run_copy / "mix" / "MANIFEST.json").read_bytes()
    flip_length(idx, 5)
    assert cli("run", *args(corpus, run_copy), *MIX) == 2
    err = capsys.readouterr().err
    assert f"{idx} has other content than recorded (sha256 differs, same size)" in err, err
    assert "changed since stage tokenize wrote it" in err and "pipeline run --force tokenize" in err
    assert not (run_copy / "mix.partial").exists()  # refused before the stage started

    forget_sha256(run_copy, "tokenize", "web.idx")  # the reader's structure check catches it too
    assert cli("run", *args(corpus, run_copy), *MIX) == 2
    err = capsys.readouterr().err
    assert f"{idx}: sequence 6 starts at byte" in err and "sequence 5 (length" in err, err
    assert (run_copy / "mix" / "MANIFEST.json").read_bytes() == mixed  # the earlier mix is untouched


def test_hashing_stops_at_its_budget_and_says_so_and_the_reader_still_refuses_the_damage(corpus, run_copy, capsys,
                                                                                         caplog, monkeypatch):
    import pipeline.integrity

    monkeypatch.setattr(pipeline.integrity, "HASH_SECONDS", 0.0)
    caplog.set_level(logging.INFO, logger="pipeline")
    flip_length(run_copy / "tokenize" / "math.idx", 10)
    assert cli("run", *args(corpus, run_copy), *MIX) == 2
    log = caplog.text
    assert "upstream tokenize unchanged: 6 files at their recorded size, sha256 of 0 (0.0 MB)" in log, log
    assert "6 left at their size: the 0 s hashing budget was spent" in log
    assert f"{run_copy / 'tokenize' / 'math.idx'}: sequence 11 starts at byte" in capsys.readouterr().err


def test_changed_ids_in_the_mixed_train_bin_are_never_trained_on_and_status_verify_names_them(corpus, run_copy,
                                                                                                capsys):
    train_bin = run_copy / "mix" / "train.bin"
    tokens = np.memmap(train_bin, np.uint16, "r+")
    tokens[100:110] = tokens[200:210][::-1].copy()  # valid ids, same size: only the hash can tell
    tokens.flush()
    del tokens
    assert cli("status", *args(corpus, run_copy), "--verify") == 2
    out = capsys.readouterr().out
    assert "mix        CHANGED  1 of" in out and f"{train_bin} has other content than recorded" in out, out
    assert "tokenize   ok" in out and "tokenizer  ok" in out
    assert cli("run", *args(corpus, run_copy), *TRAIN) == 2
    err = capsys.readouterr().err
    assert f"stage train reads mix: {train_bin} has other content than recorded" in err, err
    assert "pipeline run --force mix" in err
    assert not (run_copy / "train").exists() and not (run_copy / "train.partial").exists()


@pytest.mark.parametrize("stage,damaged,only", [("tokenize", "web", MIX), ("mix", "train", TRAIN)],
                         ids=["tokenize_bin_read_by_mix", "mix_bin_read_by_train"])
def test_a_token_id_past_the_vocabulary_stops_the_stage_that_would_read_it(corpus, run_copy, capsys, stage, damaged,
                                                                           only):
    """The mix stage checks what it copies against the tokenize stage's vocabulary; the train stage scans the
    mix's ids against the tokenizer's before any process starts (no IndexError inside the ranks)."""
    vocab = json.loads((run_copy / "tokenizer" / "pipeline_tokenizer.json").read_text())["vocab_len"]
    path = run_copy / stage / f"{damaged}.bin"
    reader = IndexedReader(run_copy / stage / damaged)
    token = int(reader.pointers[2]) // 2 + 1  # document 2's second token
    del reader
    set_token(path, token, vocab)
    forget_sha256(run_copy, stage, f"{damaged}.bin")
    mixed = (run_copy / "mix" / "MANIFEST.json").read_bytes()
    assert cli("run", *args(corpus, run_copy), *only) == 2
    err = capsys.readouterr().err
    assert (f"{path}: token {token} (byte offset {2 * token}, document 2) is id {vocab}, outside the vocabulary "
            f"of {vocab}") in err, err
    assert (run_copy / "mix" / "MANIFEST.json").read_bytes() == mixed  # no new mix published
    assert not (run_copy / "train").exists() and not (run_copy / "train.partial" / "job.json").exists()  # no launch


def test_a_truncated_bin_is_refused_by_the_stage_and_by_verify_data(corpus, run_copy, capsys):
    path = run_copy / "tokenize" / "code.bin"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 2)
    assert cli("run", *args(corpus, run_copy), *MIX) == 2
    err = capsys.readouterr().err
    assert f"stage mix reads tokenize: {path} is {size - 2} bytes, not the {size} recorded" in err, err
    assert cli("verify-data", str(run_copy / "tokenize" / "code")) == 2
    err = capsys.readouterr().err
    assert f"{path}: {size - 2} bytes, but {path.with_suffix('.idx')} gives" in err and f"= {size} bytes" in err, err


def test_verify_data_and_status_verify_pass_a_sound_run(corpus, run_copy, capsys):
    vocab = json.loads((run_copy / "tokenizer" / "pipeline_tokenizer.json").read_text())["vocab_len"]
    prefix = run_copy / "mix" / "train"
    reader = IndexedReader(prefix)
    top = int(np.asarray(reader.tokens).max())
    assert cli("verify-data", f"{prefix}.idx", "--vocab-size", str(vocab)) == 0
    out = capsys.readouterr().out
    assert out.strip() == (f"{prefix}: OK: {len(reader):,} documents, {reader.num_tokens:,} uint16 tokens, "
                           f"max id {top} (< vocab size {vocab})")
    assert cli("verify-data", str(prefix), "--vocab-size", str(top)) == 2
    assert f"is id {top}, outside the vocabulary of {top}" in capsys.readouterr().err
    assert cli("status", *args(corpus, run_copy), "--verify") == 0
    out = capsys.readouterr().out
    for stage in ("tokenizer", "tokenize", "mix"):
        hashed = sum(1 for o in manifest(run_copy, stage)["outputs"].values() if "sha256" in o)
        assert f"{stage:<10} ok       " in out and f"{hashed} of them also by sha256" in out, out
    assert "train      not published" in out


def test_the_mix_records_its_largest_token_id(base_run):
    metrics = manifest(base_run, "mix")["metrics"]
    for split in ("train", "valid"):
        assert metrics[split]["max_token_id"] == int(np.asarray(IndexedReader(base_run / "mix" / split).tokens).max())


# ----------------------------------------------------------------------------- the .idx reader, fuzzed

DOCS = [np.arange(n, dtype=np.uint16) + 7 * n for n in (3, 1, 5, 2, 4)]


@pytest.fixture(scope="module")
def valid_pair(tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("fuzz")
    writer = IndexedWriter(out / "good", np.uint16)
    writer.add(np.concatenate(DOCS), np.array([len(d) for d in DOCS]))
    writer.finish()
    return out, (out / "good.idx").read_bytes(), (out / "good.bin").read_bytes()


def fields(count: int, doc_count: int) -> list:
    """(byte offset, struct format) of every field of a .idx with these counts."""
    header = [(9, "<Q"), (17, "<B"), (18, "<Q"), (26, "<Q")]
    lengths = [(HEADER_BYTES + 4 * i, "<i") for i in range(count)]
    pointers = [(HEADER_BYTES + 4 * count + 8 * i, "<q") for i in range(count)]
    docs = [(HEADER_BYTES + 12 * count + 8 * i, "<q") for i in range(doc_count)]
    return header + lengths + pointers + docs


def read_or_refuse(directory: Path, idx: bytes, data: bytes) -> None:
    """A damaged pair is a DataError; one that passes reads every document within the .bin."""
    (directory / "case.idx").write_bytes(idx)
    (directory / "case.bin").write_bytes(data)
    try:
        reader = IndexedReader(directory / "case")
    except DataError:
        return
    docs = [np.asarray(d) for d in reader]
    assert [d.size for d in docs] == [int(n) for n in reader.lengths]
    assert sum(d.size for d in docs) == reader.num_tokens == len(data) // reader.dtype.itemsize


@settings(max_examples=1000, deadline=None)
@given(case=st.one_of(
    st.tuples(st.just("random"), st.binary(max_size=300)),
    st.tuples(st.just("after header"), st.binary(max_size=300)),
    st.tuples(st.just("truncate idx"), st.integers(0, 500)),
    st.tuples(st.just("truncate bin"), st.integers(0, 500)),
    st.tuples(st.just("field"), st.integers(0, 10_000), st.integers(-(1 << 63), (1 << 64) - 1)),
    st.tuples(st.just("small field"), st.integers(0, 10_000), st.integers(-3, 40)),
))
def test_the_idx_reader_refuses_any_damage_cleanly_or_reads_correctly(valid_pair, case):
    directory, idx, data = valid_pair
    kind = case[0]
    if kind == "random":
        idx = case[1]
    elif kind == "after header":
        idx = idx[:HEADER_BYTES] + case[1]
    elif kind == "truncate idx":
        idx = idx[:case[1] % len(idx)]
    elif kind == "truncate bin":
        data = data[:case[1] % len(data)]
    else:
        offset, fmt = fields(len(DOCS), len(DOCS) + 1)[case[1] % (4 + 3 * len(DOCS) + 1)]
        bits = 8 * struct.calcsize(fmt)
        value = case[2] % (1 << bits)  # any bit pattern of the field, then read as the field's type
        if fmt[1].islower():
            value = value - (1 << bits) if value >= 1 << (bits - 1) else value
        raw = bytearray(idx)
        struct.pack_into(fmt, raw, offset, value)
        idx = bytes(raw)
    read_or_refuse(directory, idx, data)


def test_every_single_field_corruption_of_the_header_and_arrays_is_named(valid_pair):
    """Not left to chance: each field set to a wrong value gives a DataError that names the file and offset."""
    directory, idx, data = valid_pair
    count = len(DOCS)
    for offset, fmt in fields(count, count + 1):
        raw = bytearray(idx)
        (value,) = struct.unpack_from(fmt, raw, offset)
        # a document index may repeat (a document of no sequences), so it is damaged out of range
        wrong = 99 if offset == 17 else count + 1 if offset >= HEADER_BYTES + 12 * count else value + 1
        struct.pack_into(fmt, raw, offset, wrong)
        (directory / "case.idx").write_bytes(bytes(raw))
        (directory / "case.bin").write_bytes(data)
        with pytest.raises(DataError, match=r"case\.(idx|bin): .*(byte offset|bytes)"):
            IndexedReader(directory / "case")
    shutil.copy(directory / "good.idx", directory / "case.idx")
    assert len(IndexedReader(directory / "case")) == len(DOCS)
