"""Where a command writes: one rule for `pipeline convert` (and the import/export stages' calls to it) and
`pipeline preprocess`.

- Paths are resolved (symlinks, `..`) before anything is decided. A symlink *at* the destination is not
  followed: it is the thing that gets replaced, and its target is never touched.
- A destination that exists and is not an empty directory is refused unless the caller passes its
  overwrite flag. That includes a previous output of the same command: nothing is replaced unasked.
- A destination that is, contains or lies inside one of its sources, that contains the working
  directory, or that is named through a trailing `..` / `.` is refused, with or without overwrite.
- With overwrite, the old destination is moved aside and deleted only once the new one is in place;
  deleting never follows a symlink out of it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

from pipeline.errors import ConfigError


def resolve(dst: Path) -> Path:
    """The absolute destination: every symlink and `..` resolved, except a symlink at `dst` itself."""
    dst = Path(dst)
    if dst.is_symlink():
        return Path(os.path.realpath(dst.parent)) / dst.name
    return Path(os.path.realpath(dst))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check(dst: Path, sources: Iterable[Optional[Path]], overwrite: bool, key: str = "dst",
          flag: str = "overwrite=true") -> Path:
    """The resolved destination `dst` may be written (see the module docstring), or a ConfigError naming
    `key`, the path and what to do; nothing is written or removed either way."""
    dst = Path(dst)
    if dst.name in ("", ".."):  # `some/dir/..` is `some`, `.` the working directory
        raise ConfigError(f"{key}: {dst} names {resolve(dst)} through '..' or '.'; nothing was written. Give the "
                          f"destination by its own name")
    where, followed = resolve(dst), Path(os.path.realpath(dst))
    for src in filter(None, sources):
        real = Path(os.path.realpath(src))
        for target in {where, followed}:
            clash = "is or contains" if _within(real, target) else "is inside" if _within(target, real) else None
            if clash:
                raise ConfigError(f"{key}: {_shown(dst, target)} {clash} the source {src}; nothing was written. "
                                  f"Choose a destination outside it")
    cwd = Path(os.path.realpath(os.getcwd()))
    if _within(cwd, where):
        raise ConfigError(f"{key}: {_shown(dst, where)} is or contains the working directory; nothing was written")
    if os.path.lexists(where) and not overwrite and not is_empty_dir(where):
        what = (f"is a symlink (to {os.readlink(where)}; {flag} replaces the link, not its target)"
                if where.is_symlink() else "exists and is not empty" if where.is_dir() else "exists")
        raise ConfigError(f"{key}: {where} {what}; nothing was written. Pass {flag} to replace it (the old one is "
                          f"deleted only once the new one is complete), or choose another destination")
    return where


def _shown(given: Path, resolved: Path) -> str:
    return str(given) if str(given) == str(resolved) else f"{given} ({resolved})"


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())
