"""Small file helpers every layer uses: canonical and atomic JSON, hashing, replacing a directory in one
step, and storage errors (a full disk, a quota, a read-only or forbidden path) named with their path."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

from pipeline.errors import StageError, StorageError

# ----------------------------------------------------------------------------- JSON and hashing

def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file() and not p.is_symlink())


def replace_dir(new: Path, dst: Path) -> None:
    """Put `new` at `dst` in one rename. Whatever was at `dst` is moved aside first and deleted only once
    `new` is in place; if the move fails, it is put back. The one way a finished directory is published
    (stage outputs, conversions)."""
    if not os.path.lexists(dst):
        os.replace(new, dst)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{dst.name}.replaced-", dir=dst.parent))
    os.replace(dst, aside / dst.name)
    try:
        os.replace(new, dst)
    except BaseException:
        os.replace(aside / dst.name, dst)
        aside.rmdir()
        raise
    remove(aside)


def remove(path: Path) -> None:
    """Delete a file, a symlink (the link, never its target) or a directory tree (whose symlinks
    shutil.rmtree unlinks without following)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


# ----------------------------------------------------------------------------- storage errors

# errno -> (cause, what to do); anywhere in a stage or command these exit 2 with the path
STORAGE_ERRORS = {errno.ENOSPC: ("no space left on device", "free space and rerun"),
                  errno.EDQUOT: ("disk quota exceeded", "free space (or raise the quota) and rerun"),
                  errno.EROFS: ("read-only file system", "make it writable (or choose another run_dir) and rerun"),
                  errno.EACCES: ("permission denied", "fix its permissions and rerun")}
FULL_BELOW = 16 << 20  # bytes free: a filesystem this full is full


def storage_cause(error: BaseException, where: Path) -> Optional[Tuple[int, Path]]:
    """(errno, path) when `error` is a storage failure of STORAGE_ERRORS, else None; `where` stands in for
    the path when the error names none. The one full-disk detector (stages, commands, conversions)."""
    chain = [error]
    while len(chain) < 16 and (chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    failures = getattr(error, "failures", None)  # torch DCP wraps each rank's error in a CheckpointException
    if isinstance(failures, dict):
        chain += [exc for exc, _ in failures.values() if isinstance(exc, BaseException)]
    found = next((e for e in chain if isinstance(e, OSError) and e.errno in STORAGE_ERRORS), None)
    text = str(error)  # errors that lost their errno: a rank's, quoted in a failure report, and torch's zip
    # writer's ("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534", or "... file write
    # failed"), which says nothing of the cause: the free space says it
    torch_write = "inline_container.cc" in text or "file write failed" in text
    if found is not None:
        code, where = found.errno, Path(str(found.filename)) if found.filename else where
    elif "No space left on device" in text or (torch_write and _free_bytes(where) < FULL_BELOW):
        code = errno.ENOSPC
    elif "Disk quota exceeded" in text:
        code = errno.EDQUOT
    else:
        return None
    return code, where


def storage_problem(error: BaseException, where: Path) -> Optional[str]:
    """'no space left on device: <path>; free space and rerun: finished work is kept' (or the like for the
    other STORAGE_ERRORS) when `error` is one, else None."""
    found = storage_cause(error, where)
    if found is None:
        return None
    cause, fix = STORAGE_ERRORS[found[0]]
    return f"{cause}: {found[1]}; {fix}: finished work is kept"


@contextlib.contextmanager
def storage_errors(where: Path) -> Iterator[None]:
    """Turn a storage failure inside the block into a StorageError (exit 2) naming the path, or `where`."""
    try:
        yield
    except StorageError:
        raise
    except (OSError, RuntimeError) as e:  # StageError is a RuntimeError: a rank's quoted error counts too
        problem = storage_problem(e, where)
        if problem is None:
            raise
        raise StorageError(problem + (f"\n{e}" if isinstance(e, StageError) else "")) from e


def _free_bytes(where: Path) -> float:
    try:
        return shutil.disk_usage(next(p for p in (where, *where.parents) if p.exists())).free
    except (OSError, StopIteration):
        return float("inf")
