"""Run a command and measure it: wall time and the peak RSS of its whole process tree (sampled every
50 ms, workers included). Shared by the benches that time a CLI run."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import psutil


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
