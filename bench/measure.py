"""What the benches share: running a command and measuring it (wall time, peak RSS of its whole process
tree, sampled every 50 ms, workers included), the `RESULT` line a bench's child process reports, the
`--smoke` sizes and the `ratio:` summary line that tests/e2e/test_benches.py looks for."""
from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time

import psutil

RESULT = "RESULT "  # a child process's one line of figures, space-separated


def run_measured(cmd: list, env: dict | None = None) -> tuple:
    """Run a command; return (stdout, wall seconds, peak RSS of its process tree in MB). A failure exits
    with the command and the end of its stderr."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = [0]

    def sample():
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                procs = [root] + root.children(recursive=True)
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.05)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    watcher.join()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{err[-3000:]}")
    return out, seconds, peak[0] / 1e6


def run_checked(cmd: list, what: str) -> str:
    """Run a command; its stdout. A failure exits with the end of its stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{what} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def result_fields(cmd: list, what: str, **kw) -> list:
    """Run a bench's child process; the fields of its RESULT line. No such line (or a failure) exits with
    the end of its stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"{what} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return line.split()[1:]


def parse_args(ap: argparse.ArgumentParser, smoke: dict) -> argparse.Namespace:
    """Parse, with a `--smoke` flag that sets `smoke`'s values (tiny sizes, one round): every bench runs in
    seconds that way, which is how `make test` keeps them working."""
    shown = " ".join(f"--{k.replace('_', '-')} {v!r}" for k, v in smoke.items())
    ap.add_argument("--smoke", action="store_true", help=f"tiny sizes for make test: {shown}")
    args = ap.parse_args()
    if args.smoke:
        for key, value in smoke.items():
            setattr(args, key, value)
    return args


def ratio(what: str, value: float, baseline: str) -> None:
    """The summary line each bench prints, one per figure that has a target: `ratio: <what> = 1.23x <baseline>`."""
    print(f"ratio: {what} = {value:.2f}x {baseline}")
