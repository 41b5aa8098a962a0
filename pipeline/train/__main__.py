"""The train entry point under your own launcher: `torchrun ... -m pipeline.train <job.json>` (or
`deepspeed --module pipeline.train <job.json>`). The job is the one the train stage writes
(<run_dir>/train/job.json once done, train.partial/job.json while it runs); its backend picks the entry."""
import sys
from pathlib import Path

from pipeline.train.job import TrainJob

USAGE = ("usage: torchrun [options] -m pipeline.train <job.json>   (or: deepspeed --module pipeline.train "
         "<job.json>)\n<job.json>: the job the train stage writes, <run_dir>/train/job.json once done "
         "(train.partial/job.json while it runs); `pipeline run` writes it and launches this for you")

if __name__ == "__main__":  # megatron's checkpoint writer spawns processes that re-import this module
    if len(sys.argv) < 2 or sys.argv[-1] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    job_path = sys.argv[-1]
    if not Path(job_path).is_file():
        print(f"error: {job_path}: no such job file\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    if TrainJob.load(job_path).train.backend == "megatron":
        from torch.distributed.elastic.multiprocessing.errors import record

        from pipeline.train.megatron_entry import main

        record(main)(job_path)
    else:
        from pipeline.train.hf_entry import run_and_exit

        run_and_exit(job_path)
