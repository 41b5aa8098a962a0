"""The tokenize stage on Ray (data.tokenize.executor=ray): the same bytes as the local executor, on an
embedded Ray and on a two-node Ray cluster started with `ray start`, through a worker killed mid-shard.

Loopback only. Ray swaps 127.0.0.1 for the host's network address as soon as a second node joins, so
the two nodes are 127.0.0.2 (head) and 127.0.0.3, both loopback addresses."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.launch import free_port

from conftest import SOURCES, cli_subprocess, fast_overrides, read_bytes

RAY = Path(sys.executable).with_name("ray")
ONLY_TOKENIZE = ("--only", "tokenizer,tokenize")


def with_base_tokenizer(base_run: Path, run_dir: Path) -> Path:
    """A run dir holding the base run's tokenizer stage only, so tokenize runs again with another executor."""
    run_dir.mkdir(parents=True)
    shutil.copytree(base_run / "tokenizer", run_dir / "tokenizer")
    return run_dir


def assert_same_bytes(run_dir: Path, base_run: Path) -> None:
    for s in SOURCES:
        assert read_bytes(run_dir / "tokenize" / s) == read_bytes(base_run / "tokenize" / s), s


@pytest.fixture(scope="module", autouse=True)
def ray_without_tokens():
    """Ray >= 2.5x turns on token auth for a new embedded cluster and saves the token to ~/.ray, which
    changes how a cluster started later with `ray start` authenticates. These throwaway loopback
    clusters go without, so the tests do not depend on each other or on ~/.ray."""
    before = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    yield
    if before is None:
        os.environ.pop("RAY_AUTH_MODE")
    else:
        os.environ["RAY_AUTH_MODE"] = before


@pytest.fixture(scope="module")
def ray_cluster():
    """A head on 127.0.0.2 and a worker node on 127.0.0.3, one CPU each; its address."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head = [str(RAY), "start", "--head", "--node-ip-address=127.0.0.2", f"--port={port}", "--num-cpus=1",
            "--include-dashboard=false", f"--temp-dir={temp}"]
    subprocess.run(head, check=True, env=env, capture_output=True)
    subprocess.run([str(RAY), "start", f"--address=127.0.0.2:{port}", "--node-ip-address=127.0.0.3", "--num-cpus=1"],
                   check=True, env=env, capture_output=True)
    yield f"127.0.0.2:{port}"
    subprocess.run([str(RAY), "stop", "--force"], env=env, capture_output=True)
    shutil.rmtree(temp, ignore_errors=True)


def test_embedded_ray_gives_the_local_executors_bytes(corpus, base_run, tmp_path):
    run_dir = with_base_tokenizer(base_run, tmp_path / "embedded")
    result = cli_subprocess("run", *fast_overrides(corpus, run_dir, "data.tokenize.executor=ray",
                                                   "data.tokenize.ray_address=local"), *ONLY_TOKENIZE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tokenize: Ray at local, 2 CPUs on 1 node(s)" in result.stderr
    assert_same_bytes(run_dir, base_run)


def test_a_two_node_ray_cluster_gives_the_local_executors_bytes(corpus, base_run, ray_cluster, tmp_path):
    run_dir = with_base_tokenizer(base_run, tmp_path / "cluster")
    result = cli_subprocess("run", *fast_overrides(corpus, run_dir, "data.tokenize.executor=ray",
                                                   f"data.tokenize.ray_address={ray_cluster}"), *ONLY_TOKENIZE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"tokenize: Ray at {ray_cluster}, 2 CPUs on 2 node(s)" in result.stderr
    assert_same_bytes(run_dir, base_run)


def shard_task_pids():
    """Ray worker processes running a shard task (Ray titles them after the task)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if b"_ray_encode_shard" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


def test_a_worker_killed_mid_shard_is_retried_and_the_bytes_stay_the_same(corpus, base_run, ray_cluster, tmp_path):
    run_dir = with_base_tokenizer(base_run, tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run",
                             *fast_overrides(corpus, run_dir, "data.tokenize.executor=ray",
                                             f"data.tokenize.ray_address={ray_cluster}"), *ONLY_TOKENIZE],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed, deadline = None, time.time() + 120
    while killed is None and time.time() < deadline and proc.poll() is None:
        pids = shard_task_pids()
        if pids:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.01)
    _, err = proc.communicate(timeout=300)
    assert killed is not None, "no shard task was seen running"
    assert proc.returncode == 0, err[-3000:]
    assert_same_bytes(run_dir, base_run)


def test_a_bad_record_under_ray_names_its_file_and_line(corpus, base_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = (corpus / "web.jsonl").read_bytes().splitlines(keepends=True)[:50]
    bad.write_bytes(b"".join(lines[:7] + [b'{"text": 42}\n'] + lines[7:]))
    run_dir = tmp_path / "bad"  # a pretrained tokenizer: the bad record is met by the Ray tasks, not the BPE sample
    args = [a if not a.startswith("data.sources.web.path=") else f"data.sources.web.path={bad}"
            for a in fast_overrides(corpus, run_dir, "data.tokenize.executor=ray", "tokenizer=pretrained",
                                    f"tokenizer.pretrained={base_run / 'tokenizer'}")]
    result = cli_subprocess("run", *args, *ONLY_TOKENIZE)
    assert result.returncode == 2
    assert f"{bad}:8: 'text' is int, not a string" in result.stderr, result.stderr[-3000:]
    assert not (run_dir / "tokenize").exists()


def test_executor_settings_do_not_change_the_fingerprint(corpus, base_run, tmp_path):
    """The same bytes whatever runs them: a finished local tokenize is not redone for executor=ray."""
    result = cli_subprocess("run", *fast_overrides(corpus, base_run, "data.tokenize.executor=ray",
                                                   "data.tokenize.ray_address=auto"), "--dry-run")
    plan = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines() if line[:1].isalpha()}
    assert plan["tokenize"] == "skip", result.stdout
    assert json.loads((base_run / "tokenize" / "MANIFEST.json").read_text())["fingerprint"]
