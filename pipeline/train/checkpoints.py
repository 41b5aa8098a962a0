"""What both backends do alike with their checkpoints and settings (the layout itself is
pipeline/formats/checkpoints.py).

- identity: a checkpoint records the data and model fingerprints of the run that saved it, and
  resumes only a run with the same ones (`check_identity`);
- pruning: the newest `train.keep_checkpoints` are kept (`stale`); the megatron backend removes the
  rest after each save, the HF Trainer by its save_total_limit (which also keeps the best by eval loss);
  a checkpoint a kill left half-written is removed when a run starts, never read (`remove_half_written`);
- precision: `train.precision`, with auto = bf16 on a GPU that has it, fp32 otherwise (`resolve_precision`).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, TypeVar

from pipeline.formats.checkpoints import COMPLETE, latest_iteration

T = TypeVar("T")
PRECISIONS = ("bf16", "fp16", "fp32")


def check_identity(saved: Mapping[str, Any], identity: Dict[str, str], path: Path) -> None:
    """A checkpoint resumes only a run on the same data and model (both backends)."""
    for key, value in identity.items():
        if saved.get(key) != value:
            raise SystemExit(f"{path} was saved for a different {key.replace('_', ' ')} ({saved.get(key)} != "
                             f"{value}); it cannot be resumed here. Use a new run dir or remove {path.parent}")


def stale(checkpoints: Sequence[T], keep: int) -> List[T]:
    """Of checkpoints oldest first, the ones past the newest `keep` (none when keep <= 0: keep all)."""
    return list(checkpoints[:-keep]) if keep > 0 else []


def half_written(ckpt_root: Path, backend: str) -> List[Path]:
    """The checkpoint dirs a kill left incomplete: hf, without a completion marker; megatron, past the
    iteration the tracker names (all of them without a tracker)."""
    if backend == "hf":
        return [p for p in ckpt_root.glob("checkpoint-*") if not (p / COMPLETE).is_file()]
    latest = latest_iteration(ckpt_root)
    return [p for p in ckpt_root.glob("iter_*") if latest is None or int(p.name[5:]) > latest]


def remove_half_written(ckpt_root: Path, backend: str) -> None:
    """Called by rank 0 as a run starts, before any rank saves."""
    if ckpt_root.exists():
        for p in half_written(ckpt_root, backend):
            shutil.rmtree(p, ignore_errors=True)


def resolve_precision(precision: str) -> str:
    """train.precision: bf16 | fp16 | fp32 as given; auto is bf16 on a GPU that supports it, else fp32."""
    if precision != "auto":
        return precision
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
