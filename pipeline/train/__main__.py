"""The train entry point under your own launcher: `torchrun ... -m pipeline.train <job.json>` (or
`deepspeed --module pipeline.train <job.json>`). The job is the one the train stage writes
(<run_dir>/train/job.json once done, train.partial/job.json while it runs); its backend picks the entry."""
import sys

from pipeline.train.job import TrainJob

if __name__ == "__main__":  # megatron's checkpoint writer spawns processes that re-import this module
    job_path = sys.argv[-1]
    if TrainJob.load(job_path).train.backend == "megatron":
        from torch.distributed.elastic.multiprocessing.errors import record

        from pipeline.train.megatron_entry import main

        record(main)(job_path)
    else:
        from pipeline.train.hf_entry import run_and_exit

        run_and_exit(job_path)
