"""Per-source validation on both backends (eval_loss/<source> beside eval_loss, the mixed loss the token-weighted
mean of the sources'), `pipeline eval` giving the train stage's eval_loss, `pipeline generate`, and the samples
written at each evaluation during training."""
import json
import math
from collections import Counter

import pytest

from conftest import SOURCES, cli, cli_subprocess, copy_data_stages, fast_overrides

# 2 steps, evaluated at the last and once more at the end (the best model), on a 9k-token validation split
# (71 blocks of 128: 2 web documents, 1 code, 1 math)
TINY = ("train.max_steps=2", "train.eval_every=2", "train.save_every=2", "train.tracker=none",
        "data.mix.valid_tokens=8000", "--only", "mix,import,train")


def train_run(corpus, base_run, run_dir, *extra):
    copy_data_stages(base_run, run_dir)
    result = cli_subprocess("run", *fast_overrides(corpus, run_dir, *TINY, *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def hf_run(corpus, base_run, tmp_path_factory):
    return train_run(corpus, base_run, tmp_path_factory.mktemp("eval_hf") / "run", "launcher.nproc_per_node=1",
                     "train.global_batch_tokens=1024")


@pytest.fixture(scope="module")
def megatron_run(corpus, base_run, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval_megatron") / "run"
    return train_run(corpus, base_run, run_dir, "experiment=tiny_cpu_megatron")


def eval_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "train" / "train_log.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_loss" in r]


def check_sources(run_dir):
    """Every evaluation logged each source's loss, and the mixed one is their token-weighted mean."""
    rows = eval_rows(run_dir)
    assert rows
    for row in rows:
        tokens = {s: row[f"eval_tokens/{s}"] for s in SOURCES}
        assert all(tokens.values()) and sum(tokens.values()) == row["eval_tokens"]
        mean = sum(row[f"eval_loss/{s}"] * n for s, n in tokens.items()) / sum(tokens.values())
        assert abs(mean - row["eval_loss"]) < 1e-6, row
        assert len({round(row[f"eval_loss/{s}"], 6) for s in SOURCES}) == len(SOURCES)  # each its own
    summary = json.loads((run_dir / "train" / "train_summary.json").read_text())
    assert set(summary["eval_sources"]) == set(SOURCES)
    mean = sum(v["loss"] * v["tokens"] for v in summary["eval_sources"].values()) / sum(
        v["tokens"] for v in summary["eval_sources"].values())
    assert abs(mean - summary["eval_loss"]) < 1e-6
    # the valid split's own share of each source, token for token (the mix writes valid/<source>)
    report = json.loads((run_dir / "mix" / "mix_report.json").read_text())["splits"]["valid"]["sources"]
    assert all(0 < v["tokens"] <= report[s]["tokens"] for s, v in summary["eval_sources"].items())
    return summary


def test_hf_per_source_eval_losses_and_their_token_weighted_mean(hf_run):
    check_sources(hf_run)


def test_megatron_per_source_eval_losses_and_their_token_weighted_mean(megatron_run):
    check_sources(megatron_run)


def test_pipeline_eval_gives_the_train_stage_eval_loss(hf_run, tmp_path, capsys):
    summary = json.loads((hf_run / "train" / "train_summary.json").read_text())
    report = tmp_path / "eval.json"
    assert cli("eval", f"ckpt={hf_run / 'train' / 'hf'}", f"data={hf_run / 'mix' / 'valid'}", "seq_len=128",
               f"report={report}") == 0
    got = json.loads(report.read_text())
    assert abs(got["loss"] - summary["eval_loss"]) < 1e-5
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]))
    for s, v in summary["eval_sources"].items():
        assert got["sources"][s]["tokens"] == v["tokens"] and abs(got["sources"][s]["loss"] - v["loss"]) < 1e-5
    assert f"loss {got['loss']:.6f}" in capsys.readouterr().out


def test_pipeline_eval_of_a_source_file_tokenizes_it_with_the_checkpoints_tokenizer(hf_run, corpus, tmp_path):
    report = tmp_path / "eval.json"
    assert cli("eval", f"ckpt={hf_run / 'train' / 'hf'}", f"data={corpus / 'math.jsonl'}", "seq_len=128",
               "max_tokens=1024", f"report={report}") == 0
    got = json.loads(report.read_text())
    assert got["blocks"] == 8 and got["tokens"] == 8 * 127 and 0 < got["loss"] < 20 and got["sources"] == {}


def test_pipeline_generate_prints_k_samples(hf_run, capsys):
    assert cli("generate", f"ckpt={hf_run / 'train' / 'hf'}", "prompt=def f", "max_new_tokens=4", "samples=3",
               "temperature=1.0") == 0
    out = capsys.readouterr().out
    heads = [line for line in out.splitlines() if line.startswith("--- sample")]
    assert heads == [f"--- sample {k}" for k in range(3)]
    assert out.count("\ndef f") == 3


def test_greedy_samples_need_one_sample(hf_run, capsys):
    assert cli("generate", f"ckpt={hf_run / 'train' / 'hf'}", "prompt=x", "samples=2") == 2
    assert "give temperature= > 0" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["hf_run", "megatron_run"])
def test_samples_are_written_at_each_evaluation(backend, request):
    run_dir = request.getfixturevalue(backend)
    rows = [json.loads(line) for line in (run_dir / "train" / "samples.jsonl").read_text().splitlines()]
    evaluations = Counter(r["step"] for r in eval_rows(run_dir))  # hf evaluates the last step twice (best model)
    # one row per prompt (train.sample_prompts' default) and evaluation; greedy: the same text each time
    assert Counter((r["step"], r["prompt"]) for r in rows) == {(s, p): n for s, n in evaluations.items()
                                                               for p in ("The", "def ")}
    assert len({(r["step"], r["prompt"], r["text"]) for r in rows}) == 2 * len(evaluations)
    assert all(r["text"] and r["sample"] == 0 for r in rows)
    manifest = json.loads((run_dir / "train" / "MANIFEST.json").read_text())
    assert "samples.jsonl" in manifest["unpinned"]


def test_megatron_samples_are_the_greedy_continuations_of_its_checkpoint(megatron_run, capsys):
    """The decode loop (positions, causal mask, TP gather, vocab cut) against HF's generate on the converted
    checkpoint of the evaluated step."""
    row = next(json.loads(line) for line in (megatron_run / "train" / "samples.jsonl").read_text().splitlines()
               if json.loads(line)["prompt"] == "def ")
    ckpt = megatron_run / "train" / "checkpoints"  # its latest is the evaluated step
    assert int((ckpt / "latest_checkpointed_iteration.txt").read_text()) == row["step"]
    assert cli("generate", f"ckpt={ckpt}", "prompt=def ", "max_new_tokens=16") == 0  # train.sample_tokens
    assert capsys.readouterr().out.endswith(f"--- sample 0\ndef {row['text']}\n")
