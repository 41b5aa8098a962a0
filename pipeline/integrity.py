"""What a stage consumes is what its upstream stages wrote: outputs checked against their manifests.

A manifest records every pinned output's size, and its sha256 when it is <= 64 MiB (`HASH_LIMIT`).
- Before a stage runs, the runner (Runner.verify_upstream) checks the outputs of each stage it reads: every size, and
  the recorded sha256s until `HASH_SECONDS` of hashing are spent for that stage (then the rest get their size only,
  and the log says how much was hashed). A changed file is a StageError naming it and the stage that wrote it.
- `pipeline status --verify` (the CLI) checks every published stage of a run dir the same way, hashing everything
  the manifests hashed, with no time limit.
Skipping a stage stays cheap: a skip checks sizes only (`Runner.missing_outputs`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from pipeline.files import sha256_file

log = logging.getLogger("pipeline")

HASH_SECONDS = 30.0  # per stage about to run: hashing its upstream outputs stops after this; sizes are always checked


@dataclass
class Verified:
    files: int = 0  # pinned outputs checked (size at least)
    hashed: int = 0  # of them, sha256 compared
    hashed_bytes: int = 0
    unhashed: int = 0  # with a recorded sha256 but not hashed: the time budget ran out
    changed: List[Tuple[str, str]] = field(default_factory=list)  # (path, what changed)


def verify_outputs(stage_dir: Path, outputs: Dict[str, Dict[str, Any]], deadline: Optional[float] = None) -> Verified:
    """Check a published stage's pinned outputs ({relative path: {size, sha256?}}, as its manifest records
    them) in `stage_dir`; hash until `deadline` (monotonic; 0 hashes nothing, None all). Sizes are always
    checked."""
    result = Verified()
    for rel, ident in outputs.items():
        path = stage_dir / rel
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
