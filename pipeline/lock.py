"""One writer per run dir: the `.lock` file of `pipeline run` (RunLock)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import psutil

from pipeline.errors import StageError
from pipeline.files import storage_errors

log = logging.getLogger("pipeline")

LOCK_HEARTBEAT = 60  # seconds: the holder refreshes the lock's mtime this often
LOCK_STALE = 600  # seconds: a lock from another host left unrefreshed this long is taken over
LOCK_EMPTY_STALE = 5  # seconds: an empty or unreadable lock older than this is taken over


class RunLock:
    """One writer per run dir: `.lock` holds {pid, host, since, stage}.

    The content goes to a temp file first, which os.link then publishes as `.lock` (failing if one exists):
    a lock is never seen half written, and a full disk leaves none. A lock is taken over when it is empty
    or unreadable and older than LOCK_EMPTY_STALE, when its pid is dead on this host, or when it is from
    another host and has not been refreshed for LOCK_STALE (the holder refreshes it every LOCK_HEARTBEAT
    from a thread); `--break-lock` takes over any lock but a live process's on this host."""

    def __init__(self, run_dir: Path, break_lock: bool = False):
        self.path = run_dir / ".lock"
        self.break_lock = break_lock
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "stage": None}
        self._done = threading.Event()

    def __enter__(self) -> "RunLock":
        with storage_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for _ in range(3):
                tmp = self._write_temp()
                try:
                    os.link(tmp, self.path)
                    break
                except FileExistsError:
                    self._take_over_or_refuse()
                finally:
                    tmp.unlink()
            else:
                raise StageError(f"could not take the lock {self.path}: other runs keep taking it; retry")
        threading.Thread(target=self._heartbeat, name="run-lock", daemon=True).start()
        return self

    def _write_temp(self) -> Path:
        fd, name = tempfile.mkstemp(prefix=".lock.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            os.unlink(name)
            raise
        return Path(name)

    def _take_over_or_refuse(self) -> None:
        try:
            inode = self.path.stat().st_ino
        except FileNotFoundError:
            return  # released meanwhile
        holder, age, stale = lock_state(self.path)
        here = holder and holder.get("host") == socket.gethostname()
        where = self.path.parent
        if stale is None and self.break_lock and not here:
            stale = "--break-lock"
        if stale is None:
            if not holder:
                raise StageError(f"{self.path} is empty and {age:.0f} s old: another run is starting in {where}; "
                                 f"retry in a few seconds (an empty lock older than {LOCK_EMPTY_STALE} s is taken "
                                 f"over)")
            if here:
                raise StageError(f"{where} is in use by pid {holder['pid']} on this host ({holder['host']}) since "
                                 f"{time.strftime('%H:%M:%S', time.localtime(holder.get('since', 0)))}; wait for it "
                                 f"to finish, or stop it" + (" (--break-lock does not take a lock from a running "
                                                            "process of this host)" if self.break_lock else ""))
            raise StageError(f"{where} is in use by pid {holder.get('pid')} on {holder.get('host')} (lock refreshed "
                             f"{age:.0f} s ago). If that run is gone (a job preempted there, say), the lock is taken "
                             f"over once it has gone {LOCK_STALE // 60} min without a refresh; or take it now with "
                             f"`pipeline run --break-lock`")
        log.warning("taking over the lock %s of pid %s on %s: %s", self.path, holder.get("pid"), holder.get("host"),
                    stale)
        aside = self.path.with_name(f".lock.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if aside.stat().st_ino != inode:  # a run that started meanwhile took it: put its lock back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        aside.unlink()

    def working_on(self, stage: str) -> None:
        """Note the stage being run in the lock (for `pipeline status`); a failure to is not fatal."""
        self.me["stage"] = stage
        try:
            tmp = self._write_temp()
        except OSError as e:
            log.warning("could not note stage %s in %s (%s)", stage, self.path, e)
            return
        os.replace(tmp, self.path)

    def _heartbeat(self) -> None:
        while not self._done.wait(LOCK_HEARTBEAT):
            try:
                os.utime(self.path)
            except OSError as e:
                log.warning("could not refresh the lock %s (%s); another host may take it over after %d min",
                            self.path, e, LOCK_STALE // 60)

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        holder, _, _ = lock_state(self.path)
        if holder and all(holder.get(k) == self.me[k] for k in ("pid", "host", "since")):  # still ours
            self.path.unlink(missing_ok=True)


def lock_state(path: Path) -> Tuple[Optional[Dict[str, Any]], float, Optional[str]]:
    """(holder, age in seconds, why the lock is stale, or None while it is held). The holder is None when
    there is no lock, {} when it is empty or unreadable."""
    try:
        age = time.time() - path.stat().st_mtime
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None, 0.0, None
    except (OSError, ValueError):
        holder = None
    if not isinstance(holder, dict) or "pid" not in holder:
        return {}, age, f"it is empty or unreadable and {age:.0f} s old" if age > LOCK_EMPTY_STALE else None
    if holder.get("host") == socket.gethostname():
        return holder, age, None if _holder_alive(holder) else f"pid {holder['pid']} is not running on this host"
    if age > LOCK_STALE:
        return holder, age, f"{holder.get('host')} has not refreshed it for {age / 60:.0f} min"
    return holder, age, None


def _holder_alive(holder: Dict[str, Any]) -> bool:
    try:
        proc = psutil.Process(int(holder["pid"]))
        # a process started after the lock was taken is not its holder: the pid was reused
        return proc.status() != psutil.STATUS_ZOMBIE and proc.create_time() <= float(holder.get("since", "inf")) + 1
    except (psutil.NoSuchProcess, ValueError, TypeError):
        return False
    except psutil.AccessDenied:
        return True
