"""The bad-input catalogue: one case per kind of bad input a user can hand the pipeline, each run through
the real CLI. Every case must exit 2, print its message (the README's "Bad inputs" table lists the same
messages; the last test keeps the two in step) and publish nothing of the stage that met it; what was
published before stays untouched. The details of each kind are tested where it is handled."""
from __future__ import annotations

import json
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Tuple

import pytest

from conftest import REPO, cli, copy_data_stages, fast_overrides

DATA = ("--only", "tokenizer,tokenize,mix")


@dataclass
class Case:
    kind: str
    make: Callable[[Path, Path, Path], List[str]]  # (corpus, base_run, tmp) -> CLI argv
    message: str  # printed on stderr; the README quotes it
    unpublished: Tuple[str, ...] = ()  # run-dir entries (relative to tmp/run) that must not exist after


def with_source(corpus: Path, tmp: Path, content: bytes, name: str = "bad.jsonl", *extra: str) -> List[str]:
    path = tmp / name
    path.write_bytes(content)
    args = fast_overrides(corpus, tmp / "run", *extra)
    return ["run", *[a if not a.startswith("data.sources.web.path=") else f"data.sources.web.path={path}"
                     for a in args], *DATA]


GOOD = b"".join(json.dumps({"text": f"document number {i} " * 8}).encode() + b"\n" for i in range(30))


def record(line: bytes) -> Callable:
    return lambda corpus, base, tmp: with_source(corpus, tmp, GOOD + line)


def config(*overrides: str) -> Callable:
    return lambda corpus, base, tmp: ["run", *fast_overrides(corpus, tmp / "run", *overrides), *DATA]


def dry_run(*overrides: str) -> Callable:
    return lambda corpus, base, tmp: ["run", *fast_overrides(corpus, tmp / "run", *overrides), "--dry-run"]


def damaged_tokenize_idx(corpus: Path, base: Path, tmp: Path) -> List[str]:
    run = copy_data_stages(base, tmp / "run")
    shutil.rmtree(run / "mix")
    idx = run / "tokenize" / "web.idx"
    raw = bytearray(idx.read_bytes())
    struct.pack_into("<i", raw, 34 + 4 * 5, struct.unpack_from("<i", raw, 34 + 4 * 5)[0] + 3)  # a length
    idx.write_bytes(bytes(raw))
    return ["run", *fast_overrides(corpus, run), "--only", "mix"]


def truncated_bin(corpus: Path, base: Path, tmp: Path) -> List[str]:
    prefix = tmp / "copy"
    shutil.copy(base / "mix" / "train.idx", f"{prefix}.idx")
    data = (base / "mix" / "train.bin").read_bytes()
    Path(f"{prefix}.bin").write_bytes(data[:len(data) // 2])
    return ["verify-data", str(prefix)]


def ids_past_vocab(corpus: Path, base: Path, tmp: Path) -> List[str]:
    return ["verify-data", str(base / "mix" / "train"), "--vocab-size", "100"]


def tiny_hf(path: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(path)
    return path


def convert_onto_a_non_empty_dir(corpus: Path, base: Path, tmp: Path) -> List[str]:
    (tmp / "taken").mkdir()
    (tmp / "taken" / "notes.txt").write_text("mine")
    return ["convert", f"src={tiny_hf(tmp / 'hf')}", f"dst={tmp / 'taken'}", "to=megatron"]


def convert_at_a_split_that_cuts_heads(corpus: Path, base: Path, tmp: Path) -> List[str]:
    return ["convert", f"src={tiny_hf(tmp / 'hf')}", f"dst={tmp / 'out'}", "to=megatron", "tp=3", "format=torch"]


CASES = [
    # records of a source (file:line, and the on_bad_record way on)
    Case("invalid JSON line", record(b'{"text": "unterminated\n'), "invalid JSON", ("run/tokenize", "run/mix")),
    Case("record without the text field", record(b'{"body": "x"}\n'), "no 'text' field", ("run/tokenize",)),
    Case("text that is not a string", record(b'{"text": 42}\n'), "'text' is int, not a string", ("run/tokenize",)),
    Case("invalid UTF-8", record(b'{"text": "bad \xff\xfe"}\n'), "invalid UTF-8", ("run/tokenize",)),
    Case("empty text", record(b'{"text": ""}\n'), "empty 'text'", ("run/tokenize",)),
    Case("a record that is not an object", record(b'["a", "list"]\n'), "not a JSON object", ("run/tokenize",)),
    # the config (named key, before any stage)
    Case("unknown config key", config("data.sources.web.text_feld=x"), "text_feld", ("run/tokenizer",)),
    Case("key added outside the schema", config("+train.lrr=1e-3"), "did you mean train.lr?", ("run/tokenizer",)),
    Case("value of the wrong type", config("data.tokenize.workers=many"), "data.tokenize.workers",
         ("run/tokenizer",)),
    Case("value outside its choices", config("data.sources.web.on_bad_record=ignore"), "on_bad_record",
         ("run/tokenizer",)),
    Case("weight for a source that does not exist", config("+data.mix.weights.nosuch=0.5"),
         "data.mix.weights: weights for unknown sources ['nosuch']", ("run/tokenizer",)),
    Case("weight that is not a finite number", config("data.mix.weights.web=inf"),
         "data.mix.weights.web: must be a finite number >= 0, got inf", ("run/tokenizer",)),
    Case("budget stop without a budget", config("data.mix.stopping=budget"),
         "data.mix.total_tokens: stopping=budget needs", ("run/tokenizer",)),
    Case("validation fraction out of range", config("data.mix.valid_fraction=1.5"),
         "data.mix.valid_fraction: must be in [0, 1)", ("run/tokenizer",)),
    Case("source path matching no file", config("data.sources.web.path=/nonexistent/*.jsonl"),
         "data.sources.web.path: no files match", ("run/tokenizer",)),
    Case("source of unknown format", lambda corpus, base, tmp: with_source(corpus, tmp, GOOD, "docs.weird"),
         "cannot tell the format of", ("run/tokenizer",)),
    # training settings, caught before the first stage (and under --dry-run)
    Case("tracker that is not installed", dry_run("train.tracker=wandb"),
         "train.tracker: wandb is not installed", ("run/tokenizer",)),
    Case("CPU offload without ZeRO", dry_run("train.offload=true", "train.zero_stage=0"),
         "train.offload: CPU offload needs ZeRO stage 1-3", ("run/tokenizer",)),
    Case("checkpoints off the evaluation steps", dry_run("train.save_every=3", "train.eval_every=2"),
         "train.save_every: 3 is not a multiple of train.eval_every 2", ("run/tokenizer",)),
    Case("tensor-parallel split that cuts heads", dry_run("experiment=tiny_cpu_megatron", "train.parallel.tp=3",
                                                          "launcher.nproc_per_node=3"),
         "are not divisible by tp 3", ("run/tokenizer",)),
    # artifacts (the file named; nothing downstream of it published)
    Case("damaged tokenize .idx", damaged_tokenize_idx, "has other content than recorded", ("run/mix",)),
    Case("truncated .bin", truncated_bin, "copy.bin", ()),
    Case("token ids past the vocabulary", ids_past_vocab, "outside the vocabulary", ()),
    Case("conversion onto a non-empty directory", convert_onto_a_non_empty_dir,
         "exists and is not empty; nothing was written", ()),
    Case("conversion at a split that cuts heads", convert_at_a_split_that_cuts_heads,
         "4 attention heads are not divisible by tp 3", ("out",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.kind.replace(" ", "_") for c in CASES])
def test_each_bad_input_exits_2_with_its_message_and_publishes_nothing(case, corpus, base_run, tmp_path, capsys):
    before = {p: p.stat().st_mtime_ns for p in base_run.rglob("*") if p.is_file()}
    argv = case.make(corpus, base_run, tmp_path)
    assert cli(*argv) == 2
    err = capsys.readouterr().err
    assert case.message in err, err
    for rel in case.unpublished:
        assert not (tmp_path / rel).exists(), rel
    assert {p: p.stat().st_mtime_ns for p in base_run.rglob("*") if p.is_file()} == before


def test_the_readme_catalogue_lists_every_case_with_its_message():
    readme = (REPO / "README.md").read_text()
    table = readme.split("### Bad inputs", 1)[1].split("\n#", 1)[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (.+?) \| `(.+?)` \|$", table, re.M)}
    assert set(rows) == {c.kind for c in CASES}
    for case in CASES:
        assert case.message in rows[case.kind], case.kind
