"""The HF backend's per-rank entry point: `deepspeed ... hf_entry.py <job.json>` (or torchrun).

The train stage writes job.json (pipeline/train/job.py: the resolved model/train settings, data and
tokenizer paths, fingerprints, the DeepSpeed config) and launches this on every rank; it also runs on
its own under any launcher. The training itself is pipeline/train/hf_backend.py.
"""
from __future__ import annotations

import os
import sys

from pipeline.lifetime import rank_dies_with_launch
from pipeline.train.job import TrainJob


def main(job_path: str) -> None:
    rank_dies_with_launch()  # ends with its launcher and with the driver (pipeline/lifetime.py)
    from pipeline.train import hf_backend  # torch, transformers: once this rank ends with its launch

    hf_backend.train(TrainJob.load(job_path))


def run_and_exit(job_path: str) -> None:
    """The process entry: main under torchelastic's `record` (a failure reaches torchrun's summary with
    its traceback), then a plain exit. Once main returns, everything is saved and every rank has passed
    the final barrier. Interpreter teardown can still abort a rank ("terminate called without an
    active exception": a native DeepSpeed/gloo thread destroyed while joinable; seen about once in 20
    ZeRO-3 runs under torchrun on CPU), which would fail a finished run. So it is skipped."""
    from torch.distributed.elastic.multiprocessing.errors import record

    record(main)(job_path)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    run_and_exit(sys.argv[-1])
