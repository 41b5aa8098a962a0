"""Experiment tracking and the progress bar, the same for both backends: rank 0 logs to swanlab (mode
local writes <work_dir>/swanlog, viewed with `swanlab watch`), and draws a progress bar only when its
output ends on a terminal (the train stage pipes the ranks' output and says so in PIPELINE_TTY)."""
from __future__ import annotations

import os
import sys

from pipeline.runner import SWANLOG
from pipeline.train.job import TrainJob


def show_progress() -> bool:
    """Whether the ranks' output ends on a terminal: directly, or through the train stage's pipe."""
    return bool(sys.stderr.isatty() or os.environ.get("PIPELINE_TTY"))


def tracker_config(job: TrainJob) -> dict:
    return {"model": job.model, "train": job.train.to_dict()}


def swanlab_run(job: TrainJob):
    """A swanlab run for this job (rank 0 only)."""
    import swanlab

    return swanlab.init(project=job.name, name=job.name, mode=job.train.tracker_mode,
                        log_dir=str(job.out / SWANLOG), config=tracker_config(job))


def wandb_run(job: TrainJob):
    import wandb

    return wandb.init(project=job.name, name=job.name, config=tracker_config(job))
