"""What a run says while it trains, the same for both backends, and the one place for it.

Rank 0's `RunLog` gets each logged train step and each evaluation from either backend and writes them
four ways: the step log file (<work_dir>/train_log.jsonl), the tracker (swanlab local by default, under
<work_dir>/swanlog, viewed with `swanlab watch`; wandb; tensorboard), and the terminal: one progress bar
for the stage with loss, lr, tokens/s (and MFU where the peak is known) when the output ends on a
terminal (the train stage pipes the ranks' output and says so in PIPELINE_TTY), else one JSON line per
logged step. Every value is a float: a string or None in a tracker's column breaks its table. At the
end it builds `train_summary.json`, whose keys are SUMMARY_KEYS on both backends.

Known third-party noise (NOISE_WARNINGS, NOISE_BARS, NOISE_CALLS) is silenced here, message by message,
by `quiet_noise()`, which both entry points call first; the train stage starts the ranks with `rank_env`.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

from pipeline.runner import SAMPLES, STEP_LOG, SWANLOG
from pipeline.train.job import TrainJob

# (category, the message's start, why it is noise): each silenced by exactly that message
NOISE_WARNINGS = (
    (UserWarning, "Transformer Engine and Apex are not installed",
     "megatron-core without them falls back to torch's optimizer and norms, as intended on CPU"),
    (UserWarning, "Apex is not installed. Falling back to Torch Norm", "the same, for the norms"),
    (UserWarning, "full scope is deprecated. Use empty cuda_graph_scope",
     "megatron-core's own TransformerConfig default sets the deprecated scope; no CUDA graphs are used"),
    (FutureWarning, "`torch.distributed.all_gather_into_tensor` is deprecated",
     "DeepSpeed's checkpoint save calls it, at every save"),
)
# torchrun sets OMP_NUM_THREADS=1 for each rank when it is unset, and prints a 3-line banner saying so
NOISE_ENV = {"OMP_NUM_THREADS": "1"}
# transformers' progress bars by their desc: save_pretrained's, one per checkpoint and per model
NOISE_BARS = ("Writing model shards",)
# (module, function): calls that only print. swanlab's local-mode greeting names the work dir
# (train.partial/swanlog), which is renamed when the stage publishes; the end of the run names the real one.
NOISE_CALLS = (("swanlab.sdk.internal.run.greeting", "welcome"), ("swanlab.sdk.internal.run.greeting", "goodbye"))

# the keys of a logged train step, on both backends (mfu only where the device's peak is known)
STEP_KEYS = ("step", "loss", "learning_rate", "grad_norm", "tokens_seen", "tokens_per_second", "tflops_per_device",
             "mfu")
# the Trainer's eval keys that are timings, not results
EVAL_TIMINGS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
# train_summary.json, both backends; a key a backend cannot fill is null
SUMMARY_KEYS = ("first_loss", "final_loss", "train_loss", "eval_loss", "eval_sources", "steps", "tokens_seen",
                "wall_seconds", "tokens_per_second", "tflops_per_device", "mfu", "precision", "world_size", "layout",
                "resumed_from", "resumed_step", "checkpoint", "best_checkpoint", "model")
SWANLAB_ID = "pipeline_experiment.json"  # in swanlog/: the experiment a resumed run goes on logging into
BAR_KEYS = (("loss", "loss", ".4g"), ("learning_rate", "lr", ".2e"), ("tokens_per_second", "tok/s", ",.0f"),
            ("mfu", "mfu", ".1%"))  # step key, shown as, format


def rank_env(env: Dict[str, str]) -> Dict[str, str]:
    """The ranks' environment with the noise filters: NOISE_WARNINGS as PYTHONWARNINGS (so warnings raised
    while modules import are caught), NOISE_ENV where unset."""
    filters = [f"ignore:{message}:{category.__name__}" for category, message, _ in NOISE_WARNINGS]
    return {**NOISE_ENV, **env, "PYTHONWARNINGS": ",".join(filter(None, [env.get("PYTHONWARNINGS"), *filters]))}


def quiet_noise() -> None:
    """Silence the known noise in this process: the warnings, and the bars and calls of the modules
    that are importable here."""
    import re

    for category, message, _ in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)
    for module, name in NOISE_CALLS:
        try:
            setattr(importlib.import_module(module), name, lambda *a, **k: None)
        except ImportError:
            pass
    if importlib.util.find_spec("transformers") is not None:
        from transformers.utils import logging as hf_logging

        if not isinstance(hf_logging.tqdm, _QuietBars):
            hf_logging.tqdm = _QuietBars(hf_logging.tqdm)


class _QuietBars:
    """transformers' tqdm factory, with the bars in NOISE_BARS disabled."""

    def __init__(self, bars):
        self._bars = bars

    def __call__(self, *args, **kwargs):
        if kwargs.get("desc") in NOISE_BARS:
            kwargs["disable"] = True
        return self._bars(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._bars, name)


def show_progress() -> bool:
    """Whether the ranks' output ends on a terminal: directly, or through the train stage's pipe."""
    return bool(sys.stderr.isatty() or os.environ.get("PIPELINE_TTY"))


def full_config(job: TrainJob) -> Dict[str, Any]:
    """The whole resolved config of the run (data, tokenizer, launcher too), from the run dir's
    config.yaml; the job's model and train alone for a job run outside a run dir."""
    path = job.out.parent / "config.yaml"
    if path.is_file():
        from omegaconf import OmegaConf

        try:
            return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        except Exception:  # an interpolation that resolves only in the driver: unresolved, as written
            return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return {"model": job.model, "train": job.train.to_dict()}


def swanlab_run(job: TrainJob):
    """A swanlab run for this job (rank 0 only). A resumed run goes on in the experiment it started:
    its id is kept in swanlog/ (SWANLAB_ID), and in local mode the run dir and the dashboard's
    experiment are reused (swanlab 0.10's local mode would open a new experiment on every init)."""
    import swanlab

    log_dir = job.out / SWANLOG
    saved = log_dir / SWANLAB_ID
    previous = json.loads(saved.read_text()) if saved.is_file() else None
    if previous and job.train.tracker_mode == "local":
        _resume_local(log_dir, previous)
    run = swanlab.init(project=job.name, name=job.name, mode=job.train.tracker_mode, log_dir=str(log_dir),
                       config=full_config(job), id=previous["id"] if previous else None,
                       resume="allow" if previous else None)
    if not previous:
        log_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps({"id": run.id, "run_dir": Path(run.dir).name}))
    return run


def _resume_local(log_dir: Path, previous: Dict[str, str]) -> None:
    """Have swanlab's next local-mode init go on in the experiment `previous` names: its run dir (swanlab
    would make a new one), and its row in the dashboard's database with the metric columns and points
    it has (swanlab's local writer only ever creates them)."""
    old = log_dir / previous["run_dir"]
    if not old.is_dir():
        return
    from swanlab.deprecated import local

    importlib.import_module("swanlab.sdk.cmd.init").ensure_run_dir = lambda *args, **kwargs: old
    # swanlab's core opens a new record file run-<id>.swanlab exclusively: the last part's keeps its data aside
    for record in old.glob("run-*.swanlab"):
        record.rename(record.with_name(f"{record.stem}.{int(record.stat().st_mtime)}.swanlab-part"))

    def on_run_initialized(self, run_dir, path, settings, *args, **kwargs):
        from swanboard.db import connect
        from swanboard.db.models import Experiment, Tag
        from swanboard.utils import get_swanlog_dir

        os.environ["SWANLAB_LOG_DIR"] = str(log_dir)
        self._run_dir = old
        self._swanlog_dir, self._console_dir, self._media_dir = old / "logs", old / "console", old / "media"
        for d in (self._swanlog_dir, self._console_dir, self._media_dir):
            d.mkdir(parents=True, exist_ok=True)
        connect(autocreate=True, path=get_swanlog_dir())
        self.exp = Experiment.get(Experiment.run_id == old.name)
        tags = list(Tag.filter(Tag.experiment_id == self.exp.id))
        for tag in tags:
            metric = local._MetricContext(tag.name, str(tag.folder), scalar=tag.type == "line")
            for part in sorted((self._swanlog_dir / str(tag.folder)).glob("*.log"), key=lambda p: int(p.stem)):
                for line in part.read_text().splitlines():  # its points so far: steps, slices, min/max
                    point = json.loads(line)
                    metric.add(point["index"], point["data"], point["create_time"], point.get("more"))
            self._metrics[tag.name] = metric
            self._created_columns.add(tag.name)
        self._next_kid = 1 + max((int(t.folder) for t in tags), default=0)
        self.exp.update_status(0)  # running again
        self._dashboard_ready = True

    local.LocalCallbacker.on_run_initialized = on_run_initialized


def wandb_run(job: TrainJob):
    import wandb

    return wandb.init(project=job.name, name=job.name, config=full_config(job))


def tracker_run(job: TrainJob):
    """The job's tracker, started (rank 0), or None."""
    name = job.train.tracker
    if name == "swanlab":
        return swanlab_run(job)
    if name == "wandb":
        return wandb_run(job)
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(job.out / "tensorboard"))
    return None


def floats(row: Dict[str, Any]) -> Dict[str, float]:
    """The row's finite numbers, as floats: what a tracker's chart and table can show."""
    out = {}
    for k, v in row.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


class RunLog:
    """Rank 0's account of the run (inactive on the other ranks): the step log file, the tracker and the
    terminal, for both backends. `run` is the tracker (samples are logged to it too)."""

    def __init__(self, job: TrainJob, active: bool):
        self.job, self.active = job, active
        self.started = time.time()
        self.first_loss: Optional[float] = None
        self.last_loss: Optional[float] = None
        self.bar = None
        self.run = tracker_run(job) if active else None

    def start(self, total_steps: int, step: int) -> None:
        """The progress bar, once the number of steps is known (on a terminal only)."""
        if self.active and self.bar is None and show_progress():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def advance(self, step: int) -> None:
        if self.bar is not None and step != self.bar.n:
            self.bar.update(step - self.bar.n)

    def train(self, step: int, loss: float, learning_rate: float, grad_norm: Optional[float],
              throughput: Dict[str, float]) -> Dict[str, float]:
        """One logged train step: loss (the mean since the last log), lr, grad norm, tokens/s."""
        row = {"step": step, "loss": loss, "learning_rate": learning_rate, "grad_norm": grad_norm,
               "tokens_seen": step * self.job.global_batch_tokens, **throughput}
        row = {k: v for k, v in floats(row).items() if k in STEP_KEYS}
        row.update(step=step, tokens_seen=step * self.job.global_batch_tokens)  # counts stay ints
        if "loss" in row:
            self.first_loss = row["loss"] if self.first_loss is None else self.first_loss
            self.last_loss = row["loss"]
        self._write(step, row)
        if self.bar is not None:
            self.advance(step)
            self.bar.set_postfix_str("  ".join(f"{label} {format(row[k], fmt)}" for k, label, fmt in BAR_KEYS
                                               if k in row), refresh=True)
        return row

    def eval(self, step: int, metrics: Dict[str, Any]) -> Dict[str, float]:
        """One evaluation, as one line: eval_loss (and per source, where the backend has them)."""
        row = {k: v for k, v in floats(metrics).items() if k.startswith("eval_") and k not in EVAL_TIMINGS}
        row = {"step": step, **row}
        self._write(step, row)
        if self.bar is not None and "eval_loss" in row:
            sources = ", ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in row.items() if k.startswith("eval_loss/"))
            self.bar.write(f"step {step}: eval_loss {row['eval_loss']:.4g}" + (f" ({sources})" if sources else ""),
                           file=sys.stderr)
        return row

    def samples(self, step: int, rows: list) -> None:
        """Generated samples (rows {prompt, sample, text}), for both backends: appended to <train>/samples.jsonl
        with the step, and to the tracker as text (its charts take floats only)."""
        if not self.active:
            return
        with open(self.job.out / SAMPLES, "a") as f:
            f.writelines(json.dumps({"step": step, **row}) + "\n" for row in rows)
        texts = {f"samples/{i}": row["prompt"] + row["text"] for i, row in enumerate(rows)}
        if hasattr(self.run, "add_text"):  # tensorboard
            for key, text in texts.items():
                self.run.add_text(key, text, step)
        elif self.job.train.tracker == "swanlab" and self.run is not None:
            import swanlab

            self.run.log({key: swanlab.Text(text) for key, text in texts.items()}, step=step)
        elif self.job.train.tracker == "wandb" and self.run is not None:
            import wandb

            self.run.log({"samples": wandb.Table(columns=["prompt", "text"],
                                                 data=[[r["prompt"], r["text"]] for r in rows])}, step=step)

    def _write(self, step: int, row: Dict[str, float]) -> None:
        if not self.active:
            return
        line = json.dumps(row)
        with open(self.job.out / STEP_LOG, "a") as f:
            f.write(line + "\n")
        values = {k: v for k, v in row.items() if k != "step"}
        if hasattr(self.run, "add_scalar"):  # tensorboard
            for k, v in values.items():
                self.run.add_scalar(k, v, step)
        elif self.run is not None:
            self.run.log(values, step=step)
        if self.bar is None:
            print(line, flush=True)

    def summary(self, **fields: Any) -> Dict[str, Any]:
        """train_summary.json: SUMMARY_KEYS, filled from `fields` and what was logged; the end-of-run
        scalars go to the tracker's config/summary, not to single-point charts."""
        unknown = set(fields) - set(SUMMARY_KEYS)
        assert not unknown, f"not summary keys: {sorted(unknown)}"
        logged = {"first_loss": self.first_loss, "final_loss": self.last_loss,
                  "wall_seconds": round(time.time() - self.started, 1)}
        out = {k: fields.get(k, logged.get(k)) for k in SUMMARY_KEYS}
        if self.active and self.run is not None:
            final = {f"final/{k}": v for k, v in floats(out).items()}
            if hasattr(self.run, "add_scalar"):
                pass  # tensorboard has no run summary; the file has it
            elif hasattr(self.run, "summary"):  # wandb
                self.run.summary.update(final)
            else:
                self.run.config.update({"final": floats(out)})
        return out

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.run is not None:
            (getattr(self.run, "finish", None) or self.run.close)()
            self.run = None
