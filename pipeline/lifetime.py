"""Processes of a run end with the run: a driver (`pipeline run`) killed with SIGKILL (the OOM killer,
`kill -9`, a preempted job) takes its tokenize workers, the launcher and the ranks with it.

- `die_with_parent`: the kernel signals this process when its parent *thread* exits (Linux
  prctl(PR_SET_PDEATHSIG); a no-op elsewhere). So a child must be started from a thread that outlives it:
  the tokenize pool's workers are spawned by the thread that submits and waits for their shards, the
  launcher by the thread that waits for it (launch.run_logged), and torchrun's agent starts its ranks from
  its main thread.
- The launcher gets SIGTERM (`launcher_preexec`): torchrun and srun stop their ranks on it, torchrun by
  killing each rank's process group, which also holds the rank's helpers (megatron-core's checkpoint
  writers).
- Each rank (`rank_dies_with_launch`, first thing in the entry points) gets SIGKILL when its launcher
  dies, and watches the driver named in PIPELINE_DRIVER (set by launch.run_logged): once the driver is
  gone it kills its process group. That covers launchers that pass nothing on: deepspeed's local runner
  dies on SIGTERM and leaves its per-node launch process and the ranks running.
- Ray's processes are Ray's: the tokenize workers of `executor=ray` are not tied to the driver here.
"""
from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import Callable, Optional

import psutil

DRIVER_ENV = "PIPELINE_DRIVER"  # <host>:<pid> of the `pipeline run` that launched the ranks
PR_SET_PDEATHSIG = 1
# loaded here, in the parent: a preexec function runs between fork and exec, where loading a library is unsafe
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent(sig: int = signal.SIGKILL, parent: Optional[int] = None) -> None:
    """Have the kernel send `sig` to this process when the thread that started it exits. With `parent`
    (the pid that started it), a parent already gone by now is noticed: the signal would never come."""
    if _prctl is None:
        return
    _prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(sig), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)


def launcher_preexec() -> Callable[[], None]:
    """A Popen preexec_fn: the launcher gets SIGTERM when this process (its starting thread) dies."""
    parent = os.getpid()
    return lambda: die_with_parent(signal.SIGTERM, parent)


def driver_env() -> str:
    """PIPELINE_DRIVER's value: this process as <host>:<pid>:<start time>."""
    return f"{socket.gethostname()}:{os.getpid()}:{psutil.Process().create_time()}"


def rank_dies_with_launch() -> None:
    """First thing in a rank: it ends with its launcher, and with the driver that started the launch.
    Run on its own (no LOCAL_RANK: not under a launcher), a rank is left alone."""
    if "LOCAL_RANK" not in os.environ:
        return
    die_with_parent(signal.SIGKILL)
    driver = _driver()
    if driver is not None:
        _watch(driver)


def _driver() -> Optional[psutil.Process]:
    """The driver in PIPELINE_DRIVER when it runs here: same host, and a process with its pid and start time
    (not one in another pid namespace that has the same hostname)."""
    host, pid, started = (os.environ.get(DRIVER_ENV, "").split(":") + ["", "", ""])[:3]
    try:
        driver = psutil.Process(int(pid))
        return driver if host == socket.gethostname() and abs(driver.create_time() - float(started)) < 1 else None
    except (ValueError, psutil.Error):
        return None


def _watch(driver: psutil.Process) -> None:
    # The launcher runs in a session of its own (launch.run_logged) and torchrun gives each rank one: the
    # group holds only the launch's processes, never the driver's shell. Otherwise only this process goes.
    try:
        whole_group = os.getpgrp() != os.getpgid(driver.pid)
    except ProcessLookupError:  # it has just exited
        whole_group = True

    def watch() -> None:
        try:
            fd = os.pidfd_open(driver.pid)  # readable once the driver has exited (Linux >= 5.3)
            if driver.is_running():  # the pid is still the driver's, not a new process's
                select.select([fd], [], [])
        except (AttributeError, OSError):  # gone already (ProcessLookupError), or no pidfd here: poll
            while driver.is_running():
                time.sleep(1.0)
        if whole_group:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="watch-driver", daemon=True).start()
