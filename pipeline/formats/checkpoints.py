"""Where each backend's checkpoints live in a train work dir, and which of them are complete.

hf:       checkpoints/checkpoint-<step>/ with PIPELINE_COMPLETE.json, written by rank 0 after every rank saved
megatron: checkpoints/iter_<step:07d>/ and latest_checkpointed_iteration.txt (Megatron-LM's layout), the
          tracker written after every rank saved; an iter dir past the tracker is half-written
Shared by the entry points (which write and resume them), conversion (which reads and writes Megatron's
layout) and the runner (which never removes them).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from pipeline.errors import ConversionError

COMPLETE = "PIPELINE_COMPLETE.json"
TRACKER = "latest_checkpointed_iteration.txt"  # Megatron-LM's name: the newest complete iteration


def complete_checkpoints(ckpts: Path) -> List[Path]:
    """The complete checkpoints in a checkpoints dir (either backend), oldest first."""
    hf = sorted((p.parent for p in ckpts.glob(f"checkpoint-*/{COMPLETE}")), key=lambda p: int(p.name.split("-")[1]))
    tracker, megatron = ckpts / TRACKER, []
    if tracker.is_file() and tracker.read_text().strip().isdigit():
        newest = int(tracker.read_text())
        megatron = sorted(p for p in ckpts.glob("iter_*") if p.name[5:].isdigit() and int(p.name[5:]) <= newest)
    return hf + megatron


def iteration_dir(ckpt_root: Path, iteration: int) -> Path:
    return ckpt_root / f"iter_{iteration:07d}"


LEGACY_RANKS = "mp_rank_*/model_optim_rng.pt"  # Megatron-LM's legacy torch format: one file per TP/PP rank


def legacy_rank_files(ckpt_root: Path) -> List[Path]:
    """The rank files of the checkpoint a tracker names, if it is in the legacy format; [] otherwise."""
    tracked = tracked_dir(ckpt_root) if (ckpt_root / TRACKER).is_file() else None
    return sorted(tracked.glob(LEGACY_RANKS)) if tracked is not None and tracked.is_dir() else []


def tracked_dir(ckpt_root: Path) -> Optional[Path]:
    """The checkpoint a Megatron checkpoints dir's tracker names: iter_<N>/, or release/ (Megatron-LM's
    released checkpoints); None without a tracker."""
    tracker = ckpt_root / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if text == "release":
        return ckpt_root / "release"
    if not text.isdigit():
        raise ConversionError(f"{tracker}: holds {text[:40]!r}, neither an iteration nor `release`")
    return iteration_dir(ckpt_root, int(text))


def latest_iteration(ckpt_root: Path) -> Optional[int]:
    tracker = ckpt_root / TRACKER
    return int(tracker.read_text().strip()) if tracker.is_file() else None
