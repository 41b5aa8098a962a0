"""The `train` stage: checks, then launches the backend's entry point on every rank and waits.

Backends: `hf` (hf_entry.py over hf_backend.py: transformers.Trainer + DeepSpeed) and `megatron`
(megatron_entry.py over megatron/: megatron-core TP/PP); the job they get is a TrainJob (job.py),
written as job.json. Everything that can be wrong with the config or the data is checked here,
before any process starts: the batch arithmetic and parallel layout (pipeline/config.py), and that
model, tokenizer and data agree on the vocabulary. The work dir keeps its checkpoints across a crash
(the stage is resumable), and the entry point resumes from the newest complete one.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from pipeline import launch
from pipeline.config import CONFIG_DIR, data_parallel_size, grad_accumulation, value_of, world_size
from pipeline.data.mix import SOURCE_IDS, valid_sources
from pipeline.data.tokenizer import tokenizer_info
from pipeline.errors import ConfigError, StageError
from pipeline.files import canonical_json
from pipeline.formats.checkpoints import complete_checkpoints, legacy_rank_files
from pipeline.formats.indexed import IndexedReader, check_training_data, token_dtype
from pipeline.models import check_model
from pipeline.runner import (
    CHECKPOINTS,
    FINGERPRINT,
    JOB_FILE,
    LAUNCHER_LOGS,
    MEGATRON_MODEL,
    SAMPLES,
    STEP_LOG,
    SUMMARY,
    SWANLOG,
    StageContext,
    launcher_log_dir,
    train_log,
)
from pipeline.train import passthrough, tracking
from pipeline.train.job import TrainJob, TrainSettings

log = logging.getLogger("pipeline")
ENTRIES = {"hf": Path(__file__).with_name("hf_entry.py"), "megatron": Path(__file__).with_name("megatron_entry.py")}


def model_vocab_size(cfg, tokenizer_len: int) -> int:
    """The embedding size: model.vocab_size, or the init checkpoint's, or len(tokenizer); never smaller."""
    if cfg.train.init and cfg.train.backend == "megatron" and not is_hf_checkpoint(cfg.train.init):
        vocab, key = megatron_init_args(cfg.train.init)["vocab_size"], "train.init"
    elif cfg.train.init:
        from transformers import AutoConfig

        vocab, key = AutoConfig.from_pretrained(cfg.train.init).vocab_size, "train.init"
    else:
        vocab, key = cfg.model.vocab_size or tokenizer_len, "model.vocab_size"
    if vocab < tokenizer_len:
        raise ConfigError(f"{key}: the model has {vocab} embeddings but the tokenizer has {tokenizer_len} tokens; "
                          f"ids past {vocab - 1} would index outside the embedding. Use a model with >= "
                          f"{tokenizer_len} (or leave model.vocab_size unset)")
    return vocab


TRACKER_PACKAGES = {"swanlab": "swanlab", "wandb": "wandb", "tensorboard": "tensorboard", "none": None}


def check_tracker(train) -> None:
    name = value_of(train.tracker)
    package = TRACKER_PACKAGES[name]
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"train.tracker: {name} is not installed; pip install {package}, or set train.tracker=none")


def check_save_every(train) -> None:
    """The HF backend keeps the best checkpoint by eval loss (load_best_model_at_end): transformers then
    needs every save to fall on an eval step, and raises in every rank after launch otherwise."""
    save, evals = train.save_every, train.eval_every
    if (save < 1) != (evals < 1):
        raise ConfigError(f"train.save_every: {save:g} and train.eval_every {evals:g} mix a fraction of the run "
                          f"with a step count; give both as fractions (< 1) or both as steps (>= 1)")
    scale = 1_000_000 if save < 1 else 1  # fractions compared as integers, as transformers does
    if round(save * scale) % round(evals * scale) != 0:
        raise ConfigError(f"train.save_every: {save:g} is not a multiple of train.eval_every {evals:g}; the hf "
                          f"backend keeps the best checkpoint by eval loss, so every save must fall on an evaluation")


def check_sequence_parallel(train) -> None:
    fused_norms = ("transformer_engine", "apex")
    if train.parallel.sequence_parallel and not any(importlib.util.find_spec(m) for m in fused_norms):
        raise ConfigError("train.parallel.sequence_parallel: needs Transformer Engine or apex norms (megatron-core's "
                          "torch norms cannot shard along the sequence); install one, or set it to false")


def check_resume_from(train) -> None:
    if train.resume_from and not Path(train.resume_from).is_dir():
        raise ConfigError(f"train.resume_from: {train.resume_from} is not a directory; give a checkpoint dir "
                          f"(hf: checkpoint-<step>, megatron: iter_<step>), or unset it to resume from the newest")


def check(cfg) -> None:
    """Everything about training that the config and this machine can tell, checked before any stage runs
    (and by --dry-run), so a bad setting costs seconds, not the hours of the data stages before it."""
    t = cfg.train
    check_model(cfg.model)  # model.family, and the model.* features that family supports
    launch.validate(cfg.launcher)
    check_tracker(t)
    check_resume_from(t)
    passthrough.check(t)  # train.hf_args / train.megatron_args names, train.attention on this machine
    if t.backend == "hf":
        deepspeed_config(t)  # offload needs ZeRO >= 1
        check_save_every(t)
    else:
        check_sequence_parallel(t)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training: `checkpoint` is the newest complete one, which a rerun resumes from."""

    def __init__(self, checkpoint: Optional[Path]):
        super().__init__(str(checkpoint))
        self.checkpoint = checkpoint


def held_checkpoints(work_dir: Path) -> List[str]:
    """The complete checkpoints in a train work dir, oldest first, relative to it: the costly work a
    partial training holds (the runner never drops it)."""
    return [str(p.relative_to(work_dir)) for p in complete_checkpoints(work_dir / CHECKPOINTS)]


# Written by the ranks and by tools pointed at them (swanlab watch, tensorboard): not pinned outputs.
UNPINNED = (f"{SWANLOG}/*", "wandb/*", "tensorboard/*", "runs/*", "train.log", "train_node*.log",
            f"{LAUNCHER_LOGS}/*", STEP_LOG, SUMMARY, SAMPLES)


def deepspeed_config(train) -> Dict[str, Any]:
    config = json.loads((CONFIG_DIR / "deepspeed" / f"zero{train.zero_stage}.json").read_text())
    if train.offload:
        if train.zero_stage == 0:
            raise ConfigError("train.offload: CPU offload needs ZeRO stage 1-3 (train.zero_stage)")
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if train.zero_stage == 3:
            config["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
    return config


def clear_shm_segments(port: int) -> None:
    """DeepSpeed's CPU all-reduce keeps a 69 MB /dev/shm segment per rank, named after the master port,
    and never removes it: runs would leak RAM, and a later run on the same port would open a stale
    workspace. The port is ours, so its segments are too."""
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        path.unlink(missing_ok=True)


def is_hf_checkpoint(path: str) -> bool:
    return (Path(path) / "config.json").is_file()


def needs_import(init: str) -> bool:
    """A megatron-backend train.init the import stage converts first: an HF dir, or a legacy Megatron
    checkpoint (megatron-core's loader reads torch_dist only)."""
    return is_hf_checkpoint(init) or bool(legacy_rank_files(Path(init)))


def megatron_init_args(path: str) -> Dict[str, Any]:
    """The args stored in a Megatron init checkpoint (train.init), read without starting any process."""
    from pipeline.train.mcore.checkpoint import read_checkpoint_args  # torch: deferred

    try:
        return read_checkpoint_args(Path(path))
    except FileNotFoundError as e:
        raise ConfigError(f"train.init: {path} is neither an HF checkpoint (config.json) nor a Megatron checkpoint "
                          f"dir of this pipeline ({e}: latest_checkpointed_iteration.txt and iter_*/)") from None


def steps_of(every: float, total: int) -> int:
    """eval_every/save_every: < 1 is a fraction of the run, >= 1 a number of steps."""
    return max(1, round(every * total)) if every < 1 else int(every)


def hf_job(cfg, data: Dict[str, int], vocab_size: int) -> Dict[str, Any]:
    return {"deepspeed": deepspeed_config(cfg.train)}


def megatron_job(cfg, data: Dict[str, int], vocab_size: int) -> Dict[str, Any]:
    """Steps are counted here, as Megatron-LM does: GPTDataset samples read seq_len + 1 tokens, so an epoch
    of N tokens is (N - 1) // seq_len sequences."""
    from pipeline.models.hf_config import padded_vocab_size

    t = cfg.train
    check_sequence_parallel(t)
    sequences = t.global_batch_tokens // t.seq_len
    total = t.max_steps or math.floor(t.epochs * ((data["train_tokens"] - 1) // t.seq_len) / sequences)
    if total < 1:
        raise ConfigError(f"train.epochs: {t.epochs} epochs of the train split is less than one step of "
                          f"{sequences} sequences; raise train.epochs or set train.max_steps")
    padded = padded_vocab_size(vocab_size, t.make_vocab_size_divisible_by, t.parallel.tp)
    model = OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True)
    init = t.init
    if init and needs_import(init):  # the import stage converted it (to this run's padding), checked by logits
        init = str(data["import_dir"] / MEGATRON_MODEL)
    if init:  # continued pretraining: the model is the init's (as with the HF backend), not model.*
        stored = megatron_init_args(init)
        model = stored["model"]
        if stored["padded_vocab_size"] != padded:
            fix = ("import it again for this TP (pipeline run --force import)" if is_hf_checkpoint(t.init)
                   else "convert it for this TP from HF (pipeline convert ... tp=N), or train at the TP it "
                        "was padded for")
            raise ConfigError(f"train.init: {init} has a {stored['padded_vocab_size']}-row embedding, this run pads "
                              f"{vocab_size} to {padded} (make_vocab_size_divisible_by "
                              f"{t.make_vocab_size_divisible_by} x tp {t.parallel.tp}); {fix}, or set "
                              f"train.make_vocab_size_divisible_by")
    return {
        "init": init,
        "model": model,
        "global_batch_sequences": sequences,
        "total_steps": total,
        "warmup_steps": min(round(t.warmup_ratio * total), total - 1),  # megatron: warmup < decay steps
        "valid_steps": max(data["valid_tokens"] - 1, 0) // t.seq_len // sequences,  # whole global batches only
        "eval_every_steps": steps_of(t.eval_every, total),
        "save_every_steps": steps_of(t.save_every, total),
        "padded_vocab_size": padded,
        # stored in every checkpoint, so converters and later runs know what it holds
        "checkpoint_args": {"model": model, "vocab_size": vocab_size, "padded_vocab_size": padded,
                            "make_vocab_size_divisible_by": t.make_vocab_size_divisible_by,
                            "eod_id": data["eod_id"], "tokenizer_dir": data["tokenizer_dir"],
                            "seq_len": t.seq_len},  # export/hf's tokenizer model_max_length
    }


BACKEND_JOBS = {"hf": hf_job, "megatron": megatron_job}


def run(ctx: StageContext) -> Dict[str, Any]:
    cfg = ctx.cfg
    info = tokenizer_info(ctx.inputs["tokenizer"])
    train_prefix, valid_prefix = ctx.inputs["mix"] / "train", ctx.inputs["mix"] / "valid"
    train_data = IndexedReader(train_prefix)
    if train_data.dtype != token_dtype(info["vocab_len"]):
        raise StageError(f"{train_prefix}.bin holds {train_data.dtype} tokens but the tokenizer has "
                         f"{info['vocab_len']} entries; the data was not made with this tokenizer")
    check_training_data(ctx.inputs["mix"], info["vocab_len"])  # no token id past the vocabulary
    vocab_size = model_vocab_size(cfg, info["vocab_len"])
    blocks = train_data.num_tokens // cfg.train.seq_len
    data = {"train_tokens": train_data.num_tokens, "valid_tokens": IndexedReader(valid_prefix).num_tokens,
            "eod_id": info["eod_id"], "tokenizer_dir": str(ctx.inputs["tokenizer"]), "work_dir": ctx.work_dir,
            "import_dir": ctx.inputs["import"]}
    accumulation = grad_accumulation(cfg)
    sequences_per_step = cfg.train.global_batch_tokens // cfg.train.seq_len
    if blocks < sequences_per_step:
        raise ConfigError(f"train.global_batch_tokens: one step needs {sequences_per_step} sequences of "
                          f"{cfg.train.seq_len} but the mixed train split has only {blocks}")
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    fields = {
        "name": ctx.run_dir.name,
        "work_dir": str(ctx.work_dir),
        "model": plain["model"],
        "train": TrainSettings.from_dict(plain["train"]),
        "init": cfg.train.init,
        "tokenizer_dir": str(ctx.inputs["tokenizer"]),
        "train_prefix": str(train_prefix),
        "valid_prefix": str(valid_prefix),
        "valid_source_ids": str(ctx.inputs["mix"] / SOURCE_IDS) if valid_sources(ctx.inputs["mix"]) else "",
        "valid_sources": valid_sources(ctx.inputs["mix"]),
        "vocab_size": vocab_size,
        "eod_id": info["eod_id"],
        "grad_accumulation": accumulation,
        "global_batch_tokens": cfg.train.global_batch_tokens,
        # a checkpoint may only be resumed by a run on the same data and the same model
        "data_fingerprint": ctx.upstream["mix"],
        "model_fingerprint": hashlib.sha256(canonical_json({
            "model": plain["model"], "init": cfg.train.init, "tokenizer": ctx.upstream["tokenizer"],
        }).encode()).hexdigest(),
        **BACKEND_JOBS[cfg.train.backend](cfg, data, vocab_size),
    }
    job_path = ctx.work_dir / JOB_FILE
    TrainJob(**fields).write(job_path)  # other nodes read it as soon as it exists
    # 2,048 tokens/step = 4 micro x 128 seq x 2 data-parallel ranks x 2 accumulation (tiny_cpu), for example
    par = cfg.train.parallel
    layout = f" (tp {par.tp} x pp {par.pp} x dp {data_parallel_size(cfg)})" if cfg.train.backend == "megatron" else ""
    log.info("train: %s backend, %d ranks%s, micro batch %d x seq %d, accumulation %d -> %s tokens/step; "
             "%d blocks of train data", cfg.train.backend, world_size(cfg), layout, cfg.train.micro_batch_size,
             cfg.train.seq_len, accumulation, f"{cfg.train.global_batch_tokens:,}", blocks)
    held = held_checkpoints(ctx.work_dir)
    if cfg.train.resume_from:
        log.info("train: resuming from %s (train.resume_from)", cfg.train.resume_from)
    elif held:
        log.info("train: resuming from %s, the newest of %d complete checkpoint(s) in %s", held[-1], len(held),
                 ctx.work_dir.name)
    # The ranks write into a pipe; tell them whether it ends on a terminal, so they draw a progress bar.
    tty = "1" if sys.stderr.isatty() else ""
    env = tracking.rank_env({**os.environ, "PYTHONUNBUFFERED": "1", "PIPELINE_TTY": tty})
    port = launch.free_port()
    cmd = launch.command(cfg.launcher, ENTRIES[cfg.train.backend], job_path, port, launcher_log_dir(ctx.work_dir, 0))
    log.info("launch: %s", " ".join(cmd))
    clear_shm_segments(port)
    try:
        rc = launch.run_logged(cmd, train_log(ctx.work_dir), env)
    except KeyboardInterrupt:  # the ranks are stopped by now, their output silenced (run_logged)
        held = held_checkpoints(ctx.work_dir)
        raise Interrupted(ctx.work_dir / held[-1] if held else None) from None
    finally:
        clear_shm_segments(port)
    if rc != 0:
        nodes = cfg.launcher.nnodes if cfg.launcher.name == "torchrun" else 1
        raise StageError(f"training exited with status {rc}; rerun resumes from the last complete checkpoint.\n"
                         + launch.failure_report([train_log(ctx.work_dir, n) for n in range(nodes)]))
    return json.loads((ctx.work_dir / SUMMARY).read_text())


# ----------------------------------------------------------------------------- nodes other than 0

def join_training(runner, launcher, poll_seconds: float = 1.0) -> int:
    """Node N > 0 of a multi-node torchrun launch. The driver on node 0 runs every stage; this node waits
    for the train stage's job (same fingerprint, on the shared run dir), starts its torchrun agent for
    it, and returns the agent's exit status. The c10d rendezvous is where the nodes meet."""
    plan = {item.stage.name: item for item in runner.plan()}
    fingerprint = plan["train"].fingerprint
    partial = runner.partial_dir("train")
    rank = launch.node_rank(launcher)
    deadline = time.monotonic() + launcher.join_timeout
    log.info("node %d: waiting for node 0 to start training in %s", rank, partial)
    while True:
        done = runner.manifest("train")
        if done and done.get("fingerprint") == fingerprint:
            log.info("node %d: training is already complete", rank)
            return 0
        marker, job_path = partial / FINGERPRINT, partial / JOB_FILE
        if marker.is_file() and marker.read_text() == fingerprint and job_path.is_file():
            break
        if time.monotonic() > deadline:
            raise ConfigError(f"launcher.join_timeout: node 0 did not start training in {launcher.join_timeout} s "
                              f"(no {job_path} for this config); is it running with the same config and run_dir?")
        time.sleep(poll_seconds)
    backend = TrainJob.load(job_path).train.backend
    env = tracking.rank_env({**os.environ, "PYTHONUNBUFFERED": "1", "PIPELINE_TTY": ""})
    cmd = launch.command(launcher, ENTRIES[backend], job_path, 0, launcher_log_dir(partial, rank), env)
    rc = launch.run_logged(cmd, train_log(partial, rank), env)
    if rc != 0:
        log.error("node %d: training failed (exit %d):\n%s", rank, rc,
                  launch.failure_report([train_log(partial, rank)]))
    return rc
