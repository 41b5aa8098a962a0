"""Failures end promptly and cleanly: a SIGKILLed driver leaves no process of its run behind, a dead
rank ends the run with its error within seconds, a full disk exits 2 naming the path and leaves no
temp file, the run lock survives full disks, dead pids and other hosts, and status shows `running`."""
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from omegaconf import OmegaConf

from pipeline import launch
from pipeline.config import compose
from pipeline.errors import DataError, StageError
from pipeline.lock import LOCK_STALE, RunLock
from pipeline.runner import Runner, Stage

from conftest import DATA_ONLY, cli, cli_subprocess, copy_data_stages, fast_overrides, read_bytes
from test_launch import rank_process
from test_train_megatron import LAYOUTS, train_args

# a megatron run (TP=2 on 2 gloo ranks) that checkpoints every 2 steps: killed right after its first one
MEGATRON_RUN = ("train.max_steps=40", "train.save_every=2", "train.eval_every=40", *LAYOUTS["tp2"])
GONE_WITHIN = 10  # seconds after the driver's SIGKILL by which nothing of its run may be left


def start(args, **kw) -> subprocess.Popen:
    """The CLI in a session of its own, so that a failing test can still clean up after it."""
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kw)


def wait_for(condition, proc, seconds=300):
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None and not condition():
        time.sleep(0.02)
    assert condition(), f"not reached (driver exit status {proc.poll()})"


def running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def survivors(tree, run_dir):
    """Of `tree` (processes seen under the driver), those still running, and any process that names the run dir."""
    named = [p for p in psutil.process_iter(["cmdline"])
             if p.pid != os.getpid() and any(str(run_dir) in arg for arg in p.info["cmdline"] or ())]
    return {p for p in [*tree, *named] if running(p)}


def assert_all_gone(tree, run_dir):
    deadline = time.time() + GONE_WITHIN
    while (left := survivors(tree, run_dir)) and time.time() < deadline:
        time.sleep(0.1)
    described = [f"{p.pid}: {' '.join(p.cmdline()[:4])}" for p in left if running(p)]
    for p in left:  # do not leave them running into the other tests
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    assert not left, described


def test_a_killed_driver_takes_its_tokenize_workers_with_it_and_status_showed_it_running(corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    # about 950 shards of 4 KiB on 2 workers: some 8 s of tokenize
    args = ["run", *fast_overrides(corpus, run_dir, "data.tokenize.shard_bytes=4096", "data.tokenize.engine=hf",
                                   "data.tokenize.workers=2"), "--only", "tokenizer,tokenize"]
    proc = start(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scratch = run_dir / "tokenize.partial" / "_scratch"
    wait_for(lambda: len(list(scratch.glob("*/*.json"))) >= 2, proc, 120)
    assert cli("status", *fast_overrides(corpus, run_dir)) == 0
    status = capsys.readouterr().out
    row = next(line.split() for line in status.splitlines() if line.startswith("tokenize "))
    assert row[1] == "running" and row[-1] == f"{proc.pid}@{socket.gethostname()}", status
    assert not (run_dir / "tokenize").exists(), "tokenize finished before the kill; make it slower"
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert sum("spawn_main" in " ".join(p.cmdline()) for p in tree) == 2, [p.cmdline() for p in tree]  # the workers
    os.kill(proc.pid, signal.SIGKILL)  # the driver alone, as the OOM killer does
    proc.wait()
    assert_all_gone(tree, run_dir)
    assert cli("status", *fast_overrides(corpus, run_dir)) == 0
    assert "tokenize   partial" in capsys.readouterr().out  # no live holder any more


def test_a_killed_driver_takes_torchrun_the_ranks_and_their_helpers_with_it(corpus, base_run, tmp_path):
    run_dir = copy_data_stages(base_run, tmp_path / "run")
    proc = start(train_args(corpus, run_dir, *MEGATRON_RUN), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tracker = run_dir / "train.partial" / "checkpoints" / "latest_checkpointed_iteration.txt"
    wait_for(tracker.is_file, proc)
    tree = psutil.Process(proc.pid).children(recursive=True)
    job = str(run_dir / "train.partial" / "job.json")
    assert sum(job in p.cmdline() for p in tree) >= 3, [p.cmdline() for p in tree]  # torchrun and 2 ranks
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert_all_gone(tree, run_dir)  # checkpoint-writer helpers of the ranks included


def test_a_rank_killed_after_a_checkpoint_ends_the_run_within_a_minute_naming_it(corpus, base_run, tmp_path):
    """megatron-core's checkpoint writer (a process per rank) holds the output pipe after its rank dies;
    the driver still returns promptly, with torchrun's summary."""
    run_dir = copy_data_stages(base_run, tmp_path / "run")
    proc = start(train_args(corpus, run_dir, *MEGATRON_RUN), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                 text=True)
    partial = run_dir / "train.partial"
    wait_for((partial / "checkpoints" / "latest_checkpointed_iteration.txt").is_file, proc)
    victim = rank_process(1, partial / "job.json")
    tree = psutil.Process(proc.pid).children(recursive=True)
    os.kill(victim, signal.SIGKILL)
    killed = time.time()
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    took = time.time() - killed
    assert_all_gone(tree, run_dir)  # the rank's helpers included
    assert proc.returncode == 2 and took < 60, took  # measured: about 3 s (it was about 650)
    assert "rank 1 on" in err and "Signal 9 (SIGKILL)" in err, err[-3000:]


def test_a_launch_whose_helper_holds_the_pipe_returns_promptly_with_the_report(tmp_path):
    """Rank 1 leaves a process behind that holds its stdout for 10 minutes, then fails."""
    script = tmp_path / "entry.py"
    script.write_text(
        "import os, subprocess, sys, time\nfrom torch.distributed.elastic.multiprocessing.errors import record\n"
        "@record\ndef main():\n    if os.environ['RANK'] == '1':\n"
        "        subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "        time.sleep(2)\n        raise ValueError('shard 7 is corrupt')\nmain()\n")
    launcher = OmegaConf.create({"name": "local", "nnodes": 1, "nproc_per_node": 2})
    cmd = launch.command(launcher, script, tmp_path / "job.json", launch.free_port(), tmp_path / "l")
    started = time.time()
    assert launch.run_logged(cmd, tmp_path / "train.log", dict(os.environ)) != 0
    assert time.time() - started < 40  # the helper alone would hold the pipe for 600 s
    report = launch.failure_report([tmp_path / "train.log"])
    assert "rank 1 on" in report and "ValueError: shard 7 is corrupt" in report.splitlines()[0], report
    assert not [p for p in psutil.process_iter(["cmdline"]) if "time.sleep(600)" in " ".join(p.info["cmdline"] or ())]


def test_a_log_that_cannot_be_written_does_not_stop_the_output_or_the_report(tmp_path, capfd):
    """/dev/full fails every write with ENOSPC: the ranks' output still reaches stderr, and the report
    is made from the output kept in memory."""
    script = tmp_path / "entry.py"
    script.write_text("import os\nfrom torch.distributed.elastic.multiprocessing.errors import record\n"
                      "@record\ndef main():\n    print('step', os.environ['RANK'], flush=True)\n"
                      "    if os.environ['RANK'] == '1':\n        raise ValueError('disk went away')\nmain()\n")
    launcher = OmegaConf.create({"name": "local", "nnodes": 1, "nproc_per_node": 2})
    cmd = launch.command(launcher, script, tmp_path / "job.json", launch.free_port(), tmp_path / "l")
    full = Path("/dev/full")
    assert launch.run_logged(cmd, full, dict(os.environ)) != 0
    assert "step 1" in capfd.readouterr().err
    report = launch.failure_report([full])
    assert "rank 1 on" in report and "ValueError: disk went away" in report.splitlines()[0], report


# ----------------------------------------------------------------------------- a full disk

@pytest.fixture(scope="module")
def unshare(tmp_path_factory):
    """The command prefix that gives a private mount namespace where a tmpfs can be mounted."""
    probe = tmp_path_factory.mktemp("probe")
    why = "unshare is not installed"
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        try:
            result = subprocess.run([*prefix, "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                                    capture_output=True, text=True)
        except FileNotFoundError:
            break
        if result.returncode == 0:
            return prefix
        why = f"{' '.join(prefix)}: {result.stderr.strip()}"
    pytest.skip(f"a full disk needs a tmpfs in a private mount namespace, and neither `unshare -m` (root) nor "
                f"`unshare -rm` works here ({why})")


def tmpfs_bytes(*dirs) -> int:
    """What these files take on a tmpfs (whole pages)."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for d in dirs for p in Path(d).rglob("*") if p.is_file())


def on_a_small_disk(unshare, run_dir, size, copy, args, out):
    """In a mount namespace: a `size`-byte tmpfs over run_dir holding `copy` (earlier stages); the CLI runs
    on it (out/1.*), the disk is then grown and the CLI runs again (out/2.*); out/after is the run dir."""
    out.mkdir()
    run_dir.mkdir()
    cli_line = " ".join([sys.executable, "-m", "pipeline.cli", *args])
    script = "\n".join([
        f"mount -t tmpfs -o size={size} tmpfs {run_dir} || exit 99",
        *(f"cp -a {c} {run_dir}/" for c in copy),
        f"{cli_line} > {out}/1.out 2> {out}/1.err; echo $? > {out}/1.rc",
        f"(cd {run_dir} && find . -type f) > {out}/1.files",
        f"mount -o remount,size=64m {run_dir}",
        f"{cli_line} > {out}/2.out 2> {out}/2.err; echo $? > {out}/2.rc",
        f"cp -a {run_dir} {out}/after",
    ])
    done = subprocess.run([*unshare, "bash", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return {name: (out / name).read_text() for name in ("1.rc", "1.err", "1.files", "2.rc", "2.err")}


@pytest.mark.parametrize("stage", ["tokenize", "mix"])
def test_a_full_disk_exits_2_naming_the_path_and_a_rerun_with_space_completes(unshare, corpus, base_run, tmp_path,
                                                                              stage):
    run_dir = tmp_path / "run"
    earlier = ["tokenizer"] if stage == "tokenize" else ["tokenizer", "tokenize"]
    size = tmpfs_bytes(*(base_run / e for e in earlier)) + 300 * 1024  # the stage needs megabytes
    got = on_a_small_disk(unshare, run_dir, size, [base_run / e for e in earlier],
                          ["run", *fast_overrides(corpus, run_dir), *DATA_ONLY], tmp_path / "out")
    assert got["1.rc"].strip() == "2", got["1.err"][-3000:]
    assert f"no space left on device: {run_dir}" in got["1.err"], got["1.err"][-3000:]
    assert "free space and rerun: finished work is kept" in got["1.err"]
    assert "Traceback" not in got["1.err"]
    files = got["1.files"].split()
    assert not [f for f in files if f.endswith(".tmp") or ".lock" in f], files  # no temp file, no lock
    assert not [f for f in files if f.startswith("./mix")], files  # not resumable: its partial is gone
    assert any(f.startswith(f"./{stage}.partial/") for f in files) == (stage == "tokenize")  # resumable: kept
    after = tmp_path / "out" / "after"
    for e in earlier:  # untouched, then skipped by the rerun
        assert {p.relative_to(after): p.read_bytes() for p in (after / e).rglob("*") if p.is_file()} == \
            {p.relative_to(base_run): p.read_bytes() for p in (base_run / e).rglob("*") if p.is_file()}
    assert got["2.rc"].strip() == "0", got["2.err"][-3000:]
    if stage == "tokenize":
        assert "resuming partial work" in got["2.err"]
    for prefix in ("tokenize/web", "tokenize/code", "mix/train", "mix/valid"):
        assert read_bytes(after / prefix) == read_bytes(base_run / prefix), prefix


def test_a_full_disk_leaves_no_empty_lock_and_torch_save_is_named(unshare, tmp_path):
    """On a full tmpfs: taking the lock fails naming it and leaves no `.lock` (the old code left a 0-byte one
    that blocked the run dir for good); torch.save's errno-less RuntimeError is named as no space too."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    code = "\n".join([
        "import torch", "from pathlib import Path",
        "from pipeline.errors import StorageError", "from pipeline.files import storage_errors",
        "from pipeline.lock import RunLock",
        f"run_dir = Path('{run_dir}')",
        "try:", "    RunLock(run_dir).__enter__()", "except StorageError as e:", "    print(e)",
        "try:", "    with storage_errors(run_dir):", "        torch.save(torch.zeros(100000), run_dir / 'model.pt')",
        "except StorageError as e:", "    print(e)", "    (run_dir / 'model.pt').unlink()"])
    (tmp_path / "on_a_full_disk.py").write_text(code)
    script = (f"mount -t tmpfs -o size=64k tmpfs {run_dir} && (head -c 1M /dev/zero > {run_dir}/filler; "
              f"{sys.executable} {tmp_path / 'on_a_full_disk.py'}; ls -A {run_dir})")
    done = subprocess.run([*unshare, "bash", "-c", script], capture_output=True, text=True)
    lines = done.stdout.splitlines()
    assert lines[:2] == [f"no space left on device: {run_dir / '.lock'}; free space and rerun: finished work is kept",
                         f"no space left on device: {run_dir}; free space and rerun: finished work is kept"], \
        done.stdout + done.stderr
    assert lines[2:] == ["filler"], done.stdout  # no .lock, no temp file


# ----------------------------------------------------------------------------- the lock

def write_lock(run_dir, age=0.0, **holder):
    lock = run_dir / ".lock"
    lock.write_text(json.dumps(holder) if holder else "")
    os.utime(lock, (time.time() - age, time.time() - age))
    return lock


def test_lock_empty_dead_and_other_host_cases(tmp_path):
    me = socket.gethostname()
    lock = write_lock(tmp_path)  # a 0-byte lock, just made: another run is starting
    with pytest.raises(StageError, match=r"is empty and 0 s old: another run is starting .* retry in a few seconds"):
        RunLock(tmp_path).__enter__()
    for holder in ({"age": 10}, {"pid": 2 ** 22 + 12345, "host": me, "since": time.time()},
                   {"pid": 1, "host": "node-b", "age": LOCK_STALE + 60}):
        write_lock(tmp_path, **holder)  # empty and 10 s old, a dead pid here, another host gone quiet
        with RunLock(tmp_path):
            assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert not lock.exists()
    write_lock(tmp_path, pid=4242, host="node-b", since=time.time(), age=30)  # another host, refreshed 30 s ago
    with pytest.raises(StageError) as refused:
        RunLock(tmp_path).__enter__()
    assert "in use by pid 4242 on node-b" in str(refused.value) and "pipeline run --break-lock" in str(refused.value)
    with RunLock(tmp_path, break_lock=True):
        assert json.loads(lock.read_text())["host"] == me
    write_lock(tmp_path, pid=os.getpid(), host=me, since=time.time())  # a live process of this host
    with pytest.raises(StageError, match="--break-lock does not take a lock from a running process"):
        RunLock(tmp_path, break_lock=True).__enter__()


def test_break_lock_from_the_cli(corpus, base_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir)
    write_lock(run_dir, pid=4242, host="node-b", since=time.time())
    refused = cli_subprocess("run", *fast_overrides(corpus, run_dir), *DATA_ONLY)
    assert refused.returncode == 2 and "in use by pid 4242 on node-b" in refused.stderr, refused.stderr
    broken = cli_subprocess("run", *fast_overrides(corpus, run_dir), *DATA_ONLY, "--break-lock")
    assert broken.returncode == 0 and "taking over the lock" in broken.stderr, broken.stderr
    assert not (run_dir / ".lock").exists()


# ----------------------------------------------------------------------------- failing stages

def test_a_failing_stage_leaves_no_partial_unless_it_resumes(corpus, base_run, tmp_path, capsys):
    run_dir = copy_data_stages(base_run, tmp_path / "run")
    mix_before = read_bytes(run_dir / "mix" / "train")
    # mix fails inside the stage, after writing part of its validation split
    assert cli("run", *fast_overrides(corpus, run_dir, "data.mix.valid_tokens=100000000"), *DATA_ONLY) == 2
    assert "validation split" in capsys.readouterr().err
    assert not (run_dir / "mix.partial").exists() and read_bytes(run_dir / "mix" / "train") == mix_before

    def fails(ctx):
        (ctx.work_dir / "shard-0.bin").write_text("finished")
        (ctx.work_dir / "shard-1.bin.tmp").write_text("half written")
        raise DataError("bad record")

    cfg = compose(fast_overrides(corpus, tmp_path / "custom"))
    for resumable in (False, True):
        runner = Runner(cfg, [Stage("work", needs=(), reads=("data.mix",), run=fails, resumable=resumable)])
        with pytest.raises(DataError):
            runner.run()
        left = sorted(p.name for p in runner.partial_dir("work").glob("*")) if resumable else None
        assert runner.partial_dir("work").exists() == resumable
        assert left is None or "shard-0.bin" in left and "shard-1.bin.tmp" not in left, left
