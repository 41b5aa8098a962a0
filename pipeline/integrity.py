"""What a stage consumes is what its upstream stages wrote: outputs checked against their manifests.

A manifest records every pinned output's size, and its sha256 when it is <= 64 MiB (`HASH_LIMIT`).
- Before a stage runs, the runner checks the outputs of each stage it reads: every size, and the recorded
  sha256s until `HASH_SECONDS` of hashing are spent for that stage (then the rest get their size only, and
  the log says how much was hashed). A changed file is a StageError naming it and the stage that wrote it.
- `pipeline status --verify` checks every published stage of a run dir the same way, hashing everything
  the manifests hashed, with no time limit.
Skipping a stage stays cheap: a skip checks sizes only (`Runner.missing_outputs`).
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from pipeline.runner import PlanItem, Runner, StageError, _unpinned, sha256_file

log = logging.getLogger("pipeline")

HASH_SECONDS = 30.0  # per stage about to run: hashing its upstream outputs stops after this; sizes are always checked


@dataclass
class Verified:
    files: int = 0  # pinned outputs checked (size at least)
    hashed: int = 0  # of them, sha256 compared
    hashed_bytes: int = 0
    unhashed: int = 0  # with a recorded sha256 but not hashed: the time budget ran out
    changed: List[Tuple[str, str]] = field(default_factory=list)  # (path, what changed)


def verify_stage(runner: Runner, name: str, manifest: Dict[str, Any], deadline: Optional[float] = None) -> Verified:
    """Check a published stage's pinned outputs against its manifest; hash until `deadline` (monotonic), or all."""
    result = Verified()
    for rel, ident in manifest.get("outputs", {}).items():
        if _unpinned(runner.stages[name], rel):  # a manifest from before the stage unpinned it
            continue
        path = runner.stage_dir(name) / rel
        result.files += 1
        if not path.is_file():
            result.changed.append((str(path), "is missing"))
        elif path.stat().st_size != ident["size"]:
            result.changed.append((str(path), f"is {path.stat().st_size} bytes, not the {ident['size']} recorded"))
        elif "sha256" in ident:
            if deadline is not None and time.monotonic() > deadline:
                result.unhashed += 1
                continue
            result.hashed += 1
            result.hashed_bytes += ident["size"]
            if sha256_file(path) != ident["sha256"]:
                result.changed.append((str(path), "has other content than recorded (sha256 differs, same size)"))
    return result


def changed_message(changed: List[Tuple[str, str]], stage: str) -> str:
    path, what = changed[0]
    more = f" (and {len(changed) - 1} more: {', '.join(p for p, _ in changed[1:4])})" if len(changed) > 1 else ""
    return (f"{path} {what}{more}: the artifact changed since stage {stage} wrote it. Rebuild it with "
            f"`pipeline run --force {stage}`")


def verify_upstream(runner: Runner, item: PlanItem) -> None:
    """Before `item` runs: the outputs of the stages it reads are what they wrote, or a StageError."""
    deadline = time.monotonic() + HASH_SECONDS
    for up in item.stage.needs:
        started = time.monotonic()
        result = verify_stage(runner, up, runner.manifest(up) or {}, deadline)
        if result.changed:
            raise StageError(f"stage {item.stage.name} reads {up}: " + changed_message(result.changed, up))
        if not result.files:
            continue
        budget = (f"; {result.unhashed} left at their size: the {HASH_SECONDS:g} s hashing budget was spent "
                  f"(`pipeline status --verify` hashes all)" if result.unhashed else "")
        log.info("[%s] upstream %s unchanged: %d files at their recorded size, sha256 of %d (%.1f MB) in %.1fs%s",
                 item.stage.name, up, result.files, result.hashed, result.hashed_bytes / 1e6,
                 time.monotonic() - started, budget)


def verify_run(runner: Runner) -> int:
    """`pipeline status --verify`: every published stage against its manifest, all recorded hashes compared.
    Prints a line per stage and per changed artifact; 2 if any changed, else 0."""
    changed = 0
    for name in runner.order:
        manifest = runner.manifest(name)
        if manifest is None:
            print(f"{name:<10} not published")
            continue
        result = verify_stage(runner, name, manifest)
        if result.changed:
            print(f"{name:<10} CHANGED  {len(result.changed)} of {result.files} files")
            for path, what in result.changed:
                print(f"    {path} {what}: rebuild it with `pipeline run --force {name}`")
        else:
            print(f"{name:<10} ok       {result.files} files at their recorded size, {result.hashed} of them also "
                  f"by sha256 ({result.hashed_bytes / 1e6:.1f} MB)")
        changed += len(result.changed)
    if changed:
        print(f"error: {changed} artifact(s) changed since their stage wrote them", file=sys.stderr)
        return 2
    return 0
