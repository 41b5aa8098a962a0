"""What a run shows and leaves: on a terminal (a real pty) one progress bar and no dicts or known noise,
Ctrl-C ending in one line that names the checkpoint and the command that resumes; off a terminal one JSON
line per logged step with the same keys on both backends; train_summary.json with the same keys on both;
the end-of-run summary and report.md naming paths that exist; `pipeline status` metrics and stale
reasons; a resumed run logging into the one swanlab experiment it started."""
import json
import os
import pty
import re
import select
import signal
import sqlite3
import sys
import time

import pytest

from pipeline.formats.checkpoints import COMPLETE
from pipeline.train import tracking

from conftest import cli_subprocess, copy_data_stages, fast_overrides

TRAIN = ("--only", "import,train,export")
HF = ("train.max_steps=6", "train.eval_every=2", "train.save_every=2", "train.logging_steps=1")
MEGATRON = ("experiment=tiny_cpu_megatron", "train.tracker=none", "train.max_steps=4", "train.logging_steps=1")
NOISE = [m for _, m, _ in tracking.NOISE_WARNINGS] + list(tracking.NOISE_BARS) + ["{'loss':", "Traceback"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def pty_run(args, interrupt_when=None, timeout=900):
    """`pipeline <args>` on a pseudo-terminal (200 columns); Ctrl-C typed once interrupt_when() holds.
    Returns the exit code and everything the terminal showed."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its controlling terminal, so Ctrl-C reaches it as a terminal's does
        # as from a shell's prompt: a test run started in the background (`make test &`) ignores SIGINT,
        # and an ignored SIGINT is inherited, so Python would install no KeyboardInterrupt handler
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execve(sys.executable, [sys.executable, "-m", "pipeline.cli", *args],
                  {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "LINES": "50"})
    import fcntl
    import struct
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    out, typed, deadline = bytearray(), False, time.monotonic() + timeout
    while time.monotonic() < deadline:
        if interrupt_when and not typed and interrupt_when():
            os.write(fd, b"\x03")
            typed = True
        if select.select([fd], [], [], 0.2)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child has exited and closed the terminal
                break
            if not chunk:
                break
            out += chunk
    else:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def screen_lines(text):
    """The lines as they end up on the screen: ANSI codes dropped, each \\r-rewritten line's last version."""
    return [ANSI.sub("", line).split("\r")[-1].rstrip() for line in text.replace("\r\n", "\n").split("\n")]


def json_lines(text):
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


@pytest.fixture(scope="module")
def hf_run(corpus, base_run, tmp_path_factory):
    """The HF backend with swanlab (the default tracker) on a terminal, Ctrl-C once checkpoint-2 is
    complete; then the same command off a terminal, which resumes."""
    run_dir = copy_data_stages(base_run, tmp_path_factory.mktemp("hf") / "run")
    args = ["run", *fast_overrides(corpus, run_dir, *HF), *TRAIN]
    marker = run_dir / "train.partial" / "checkpoints" / "checkpoint-2" / COMPLETE
    started = time.monotonic()
    rc, shown = pty_run(args, interrupt_when=marker.is_file)
    interrupted_seconds = time.monotonic() - started
    held = sorted((p for p in marker.parent.parent.glob("checkpoint-*") if (p / COMPLETE).is_file()),
                  key=lambda p: int(p.name.split("-")[1]))  # before the rerun resumes, and publishes
    resumed = cli_subprocess(*args)
    print(f"hf: interrupted run {interrupted_seconds:.0f} s, resumed run {time.monotonic() - started:.0f} s in all")
    return {"dir": run_dir, "args": args, "rc": rc, "terminal": shown, "held": held, "resumed": resumed}


@pytest.fixture(scope="module")
def megatron_run(corpus, base_run, tmp_path_factory):
    run_dir = copy_data_stages(base_run, tmp_path_factory.mktemp("megatron") / "run")
    args = ["run", *fast_overrides(corpus, run_dir, *MEGATRON), *TRAIN]
    rc, shown = pty_run(args)
    assert rc == 0, shown[-3000:]
    return {"dir": run_dir, "args": args, "terminal": shown}


def test_ctrl_c_on_a_terminal_ends_in_one_line_naming_the_checkpoint_and_the_resume_command(hf_run):
    lines = [line for line in screen_lines(hf_run["terminal"]) if line.strip()]
    assert hf_run["rc"] == 130, hf_run["terminal"][-3000:]
    last = lines[-1]
    m = re.fullmatch(r"interrupted; last complete checkpoint: (\S+); resume with: pipeline (.+)", last)
    assert m, lines[-5:]
    assert hf_run["held"] and m.group(1) == str(hf_run["held"][-1]), (m.group(1), hf_run["held"])  # the newest
    assert m.group(2).split()[0] == "run" and f"run_dir={hf_run['dir']}" in m.group(2)
    for noise in NOISE:  # no tracebacks from the stopped ranks, no dicts, no known third-party noise
        assert noise not in hf_run["terminal"], noise
    assert re.search(r"train: +\d+%\|.*\| [1-6]/6 .*loss \d", hf_run["terminal"])  # the bar, with its loss


def test_the_resumed_run_continues_the_one_swanlab_experiment(hf_run):
    resumed, run_dir = hf_run["resumed"], hf_run["dir"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint-" in resumed.stderr + resumed.stdout
    swanlog = run_dir / "train" / "swanlog"
    runs = sorted(p.name for p in swanlog.glob("run-*"))
    assert len(runs) == 1, runs  # one experiment dir, written by both launches
    db = sqlite3.connect(swanlog / "runs.swanlab")
    experiments = db.execute("select run_id from experiment").fetchall()
    assert experiments == [(runs[0],)], experiments
    (folder,), = db.execute("select folder from tag where name = 'loss'").fetchall()
    points = [json.loads(line)["index"] for part in (swanlog / runs[0] / "logs" / folder).glob("*.log")
              for line in part.read_text().splitlines()]
    # one series, going on after the checkpoint it resumed from. The first launch's points are not always
    # there: swanlab 0.10's local writer can rewrite its chunk file (logs/<tag>/1000.log) on the resumed
    # init (seen here, once in several runs); train_log.jsonl keeps every step (README, Tracking).
    assert set(range(3, 7)) <= set(points) <= set(range(1, 7)) and len(points) == len(set(points)), points
    # the full resolved config: data, tokenizer and launcher too, not only model and train
    config = (swanlog / runs[0]).rglob("config.yaml")
    text = "\n".join(p.read_text() for p in config)
    for section in ("data:", "tokenizer:", "launcher:", "model:", "train:"):
        assert section in text, section


def test_off_a_terminal_each_step_is_one_json_line_with_the_same_keys_on_both_backends(hf_run, megatron_run):
    printed = json_lines(hf_run["resumed"].stderr + hf_run["resumed"].stdout)
    logged = [json.loads(line) for line in (hf_run["dir"] / "train" / "train_log.jsonl").read_text().splitlines()]
    assert printed and printed == logged[-len(printed):]  # what is printed is what the step log has
    hf_train = [r for r in printed if "loss" in r]
    megatron_train = [json.loads(line) for line in
                      (megatron_run["dir"] / "train" / "train_log.jsonl").read_text().splitlines() if '"loss"' in line]
    keys = set(tracking.STEP_KEYS) - {"mfu"}  # no GPU here: no peak, so no MFU
    assert all(set(r) == keys for r in hf_train + megatron_train), (hf_train[0], megatron_train[0])
    assert all(isinstance(v, (int, float)) for r in hf_train + megatron_train for v in r.values())
    evals = [r for r in printed if "eval_loss" in r]
    assert evals and all("loss" not in r for r in evals)  # an evaluation is a line of its own


def test_train_summary_has_the_same_keys_on_both_backends(hf_run, megatron_run):
    hf, mg = (json.loads((r["dir"] / "train" / "train_summary.json").read_text()) for r in (hf_run, megatron_run))
    assert list(hf) == list(mg) == list(tracking.SUMMARY_KEYS)
    assert hf["resumed_from"].startswith("checkpoint-") and mg["resumed_from"] is None
    for summary in (hf, mg):
        assert summary["final_loss"] is not None and summary["eval_loss"] is not None and summary["wall_seconds"] > 0


@pytest.mark.parametrize("backend", ["hf", "megatron"])
def test_the_end_of_run_summary_and_report_name_paths_that_exist(hf_run, megatron_run, backend):
    run = hf_run if backend == "hf" else megatron_run
    shown = run["resumed"].stdout if backend == "hf" else "\n".join(screen_lines(run["terminal"]))
    report = run["dir"] / "report.md"
    assert report.is_file() and f"report: {report}" in shown
    text = report.read_text()
    paths = re.findall(r"`(/[^`\s\"]+)`", text) + re.findall(r'"(/[^"]+)"', text)
    assert paths and all(os.path.exists(p) for p in paths), [p for p in paths if not os.path.exists(p)]
    assert (run["dir"] / "export" / "hf").as_posix() in text  # where the model is, and how to load it
    assert "AutoModelForCausalLM.from_pretrained" in text and "eval loss" in text and "tokens/s" in text
    assert "mix (train split, achieved / target): web" in text
    png = run["dir"] / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "![loss curve](loss_curve.png)" in text
    if backend == "hf":  # the dashboard command names the published swanlog, which exists
        m = re.search(r"dashboard: swanlab watch (\S+)", shown)
        assert m and m.group(1) == str(run["dir"] / "train" / "swanlog") and os.path.isdir(m.group(1))
        assert "train.partial" not in shown
    else:  # the megatron bar on a terminal, without the Transformer Engine / Apex warnings
        for noise in NOISE:
            assert noise not in run["terminal"], noise
        assert re.search(r"train: +100%\|.*\| 4/4 .*loss \d", run["terminal"])


def test_status_shows_metrics_stale_reasons_and_the_run_dir(hf_run):
    args = hf_run["args"][1:-len(TRAIN)]
    done = cli_subprocess("status", *args)
    assert done.returncode == 0 and f"run dir: {hf_run['dir']}" in done.stdout
    assert re.search(r"train +done .*\n +steps 6 +tokens_seen 12,288 +final_loss \S+ +eval_loss \S+", done.stdout)
    changed = cli_subprocess("status", *args, "train.lr=0.003")
    assert re.search(r"train +stale .*\n +stale: config train.lr: 0.001 -> 0.003", changed.stdout), changed.stdout
