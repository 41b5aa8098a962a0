"""Where the data stages' tasks run: worker processes of this machine (LocalPool), or Ray tasks over a
Ray cluster or an embedded single-machine Ray (RayPool). Both take a module-level `task(job) -> result`
and offer the same four calls: submit, wait (for any), result, close.

Each worker does one core's worth of work (`single_threaded`): no nested thread pools fighting for
the cores. A local worker dies with the driver, even a SIGKILLed one (pipeline/lifetime.py); Ray's
processes are Ray's.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing as mp
import os
from typing import Any, Callable, Dict

from pipeline.errors import DataError
from pipeline.lifetime import die_with_parent

log = logging.getLogger("pipeline")

Task = Callable[[Any], Dict[str, Any]]


def single_threaded() -> None:
    """One thread per worker for the tokenizer libraries, which would each start a pool per core."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # HF tokenizers
    os.environ["RAYON_NUM_THREADS"] = "1"  # HF tokenizers and gigatoken
    os.environ["FASTOKENS_BPE_THREADS"] = "1"  # fastokens sizes its own pool from this, not from rayon's


def _local_worker_init() -> None:
    # Its parent is the thread that submits the tasks and waits for them (ProcessPoolExecutor spawns on
    # submit), which outlives the pool.
    die_with_parent(parent=mp.parent_process().pid)
    single_threaded()


class LocalPool:
    """Tasks on worker processes of this machine."""

    def __init__(self, workers: int, task: Task):
        ctx = mp.get_context("spawn")  # fork would copy a tokenizer's thread pool into a broken child
        self.pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_local_worker_init)
        self.task, self.slots = task, workers

    def submit(self, job: Any) -> cf.Future:
        return self.pool.submit(self.task, job)

    def wait(self, handles) -> list:
        return list(cf.wait(handles, return_when=cf.FIRST_COMPLETED)[0])

    def result(self, handle: cf.Future, what: str) -> Dict[str, Any]:
        return handle.result()

    def close(self, handles) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)  # cancels whatever has not started


class RayPool:
    """Tasks on a Ray cluster (`address`), or on an embedded Ray on this machine (`local`).

    Tasks write their own files (to the run dir's scratch), so the run dir must be on storage every node
    sees. A task whose worker dies is retried by Ray (RETRIES). The task calls `single_threaded()` itself
    (Ray's worker processes run many tasks; its name is the one Ray shows for them)."""

    RETRIES = 3  # per task, when its worker process or node dies

    def __init__(self, address: str, workers: int, task: Task, label: str):
        if address == "local":
            # an embedded single-machine Ray: Ray would otherwise announce (and bind) this host's
            # network address; this keeps it on loopback, as Ray does on macOS
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray

        self.ray = ray
        if address == "local":
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
        self.remote = ray.remote(num_cpus=1, max_retries=self.RETRIES)(task)
        self.slots = max(1, int(ray.cluster_resources().get("CPU", workers)))
        log.info("%s: Ray at %s, %d CPUs on %d node(s)", label, address, self.slots, len(ray.nodes()))

    def submit(self, job: Any):
        return self.remote.remote(job)

    def wait(self, handles) -> list:
        return self.ray.wait(list(handles), num_returns=1)[0]

    def result(self, handle, what: str) -> Dict[str, Any]:
        """The task's result; `what` names the task in errors ("tokenize shard 3 of web.jsonl")."""
        from ray.exceptions import RayError, RayTaskError

        try:
            return self.ray.get(handle)
        except RayTaskError as e:  # the task raised: a bad record (policy error) keeps its file:line
            cause = e.cause if isinstance(e.cause, Exception) else e
            if isinstance(cause, DataError):
                raise cause from None
            raise DataError(f"{what} failed on a Ray worker: {type(cause).__name__}: {cause}") from None
        except RayError as e:  # the worker or its node died, more often than the retries allow
            raise DataError(f"{what}: {type(e).__name__}: {e}; a rerun redoes only the tasks that did not "
                            f"finish") from None

    def close(self, handles) -> None:
        for handle in handles:
            self.ray.cancel(handle, force=True)
        self.ray.shutdown()


