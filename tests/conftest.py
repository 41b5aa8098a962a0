"""Shared fixtures: the shipped sample corpus as plain jsonl (so byte-range shards are exercised),
a fast test config, and helpers that run the real CLI in-process or as a subprocess."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = Path(__file__).resolve().parent / "unit"


def pytest_collection_modifyitems(items):
    """tests/unit: the fast tier (`make test-fast`, `-m unit`); the rest, end to end (`-m e2e`)."""
    for item in items:
        item.add_marker(pytest.mark.unit if UNIT in Path(item.fspath).resolve().parents else pytest.mark.e2e)
SAMPLE = REPO / "data" / "sample"
SOURCES = ("web", "code", "math")
DATA_ONLY = ("--only", "tokenizer,tokenize,mix")  # the data stages, without training


def fast_overrides(corpus: Path, run_dir: Path, *extra: str) -> list:
    """The default experiment, pointed at `corpus`, with a small tokenizer so a run takes seconds."""
    return [f"run_dir={run_dir}", "tokenizer.vocab_size=1024", "tokenizer.sample_docs_per_source=100",
            "data.tokenize.shard_bytes=262144",
            *[f"data.sources.{s}.path={corpus / (s + '.jsonl')}" for s in SOURCES], *extra]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and all its descendants at once, as the OOM killer or a job scheduler's
    cgroup kill does. A process-group kill is not enough: torchrun starts each rank in its own session."""
    import psutil

    parent = psutil.Process(proc.pid)
    tree = [parent, *parent.children(recursive=True)]
    for member in tree:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(tree[1:], timeout=30)


def cli(*args: str) -> int:
    from pipeline.cli import main

    return main(list(args))


def cli_subprocess(*args: str, cwd: Path | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, **kw)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    for s in SOURCES:
        with gzip.open(SAMPLE / f"{s}.jsonl.gz", "rb") as f, open(out / f"{s}.jsonl", "wb") as g:
            shutil.copyfileobj(f, g)
    return out


@pytest.fixture(scope="session")
def base_run(corpus, tmp_path_factory) -> Path:
    """One complete run of every stage; tests copy it rather than redo it."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    assert cli("run", *fast_overrides(corpus, run_dir), *DATA_ONLY) == 0
    return run_dir


@pytest.fixture(scope="session")
def default_run(tmp_path_factory) -> Path:
    """The default experiment as `make pretrain` runs it, unchanged but for the run dir, once per session
    (tests/e2e/test_pipeline.py checks its outputs, tests/golden its losses)."""
    run_dir = tmp_path_factory.mktemp("default")
    result = cli_subprocess("run", f"run_dir={run_dir}", cwd=run_dir)
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture(scope="session")
def tokenizer_dir(base_run) -> Path:
    return base_run / "tokenizer"


def copy_data_stages(base_run, run_dir):
    """The base run's data stages, without any training it may have."""
    shutil.copytree(base_run, run_dir, ignore=lambda d, names: [n for n in names if d == str(base_run)
                                                                and n.startswith("train")])
    return run_dir


def log_losses(run_dir):
    """step -> loss from the rank-0 step log; a resumed run's later entry for a step wins."""
    rows = [json.loads(line) for line in (run_dir / "train" / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def read_bytes(prefix: Path) -> tuple:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def tiny_hf(family: str, path, **overrides):
    """A 2-layer random HF model with real head geometry (GQA where the family has it), biases and norms
    random so that bias and norm mappings are exercised. `llama3`: a Llama 3.2-like llama (tied
    embeddings, llama3 RoPE scaling, head_dim 32 != hidden / heads); `mistral`: Mistral's head_dim."""
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed(0)
    common = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    model = {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**{**common, **overrides})),
        "llama3": lambda: LlamaForCausalLM(LlamaConfig(**{**common, "head_dim": 32, "tie_word_embeddings": True,
                                                          "max_position_embeddings": 128,
                                                          "rope_parameters": LLAMA3_ROPE, **overrides})),
        "mistral": lambda: MistralForCausalLM(MistralConfig(**{**common, "head_dim": 24, "sliding_window": None,
                                                               **overrides})),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**{**common, "tie_word_embeddings": True, **overrides})),
        "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**{**common, "head_dim": 32, "tie_word_embeddings": False,
                                                         **overrides})),
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                                   **overrides)),
    }[family]()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
            elif name.endswith("norm.weight"):  # not all ones: a norm mapped wrong shows in the logits
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path


def convert(*pairs):
    """`pipeline convert key=value ...` in a subprocess."""
    return cli_subprocess("convert", *pairs)
