"""The HF backend's per-rank entry point: `deepspeed ... hf_entry.py <job.json>` (or torchrun).

The train stage writes job.json (the resolved model/train settings, data and tokenizer paths,
fingerprints, the DeepSpeed config) and launches this on every rank; it also runs on its own under
any launcher. Checkpoints are `checkpoint-<step>/` under the job's work dir; one counts only once
its PIPELINE_COMPLETE.json exists, written by rank 0 after every rank has saved, so a kill during a
save leaves a checkpoint that resume ignores. The marker records every file's sha256. DeepSpeed
unpickles its files in full on resume, so a resume first scans them for what they import (only
DeepSpeed's own classes pass) and checks the recorded hashes (check_resumable).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

from pipeline.lifetime import rank_dies_with_launch
from pipeline.train.checkpoints import COMPLETE
LOG = "train_log.jsonl"  # one JSON line per logged step, rank 0, appended across resumes

# HF config field per schema field, for each family (AutoConfig.for_model(family, ...)).
CONFIG_FIELDS = {
    "llama": {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_attention_heads":
              "num_attention_heads", "num_key_value_heads": "num_key_value_heads", "ffn_hidden_size":
              "intermediate_size", "max_position_embeddings": "max_position_embeddings", "rope_theta": "rope_theta",
              "norm_eps": "rms_norm_eps", "tie_word_embeddings": "tie_word_embeddings"},
    "gpt2": {"hidden_size": "n_embd", "num_layers": "n_layer", "num_attention_heads": "n_head",
             "ffn_hidden_size": "n_inner", "max_position_embeddings": "n_positions", "norm_eps": "layer_norm_epsilon",
             "tie_word_embeddings": "tie_word_embeddings"},
}
CONFIG_FIELDS["qwen2"] = CONFIG_FIELDS["llama"]


def model_config(model: Dict[str, Any], vocab_size: int, eod_id: int):
    from transformers import AutoConfig

    kwargs = {hf: model[ours] for ours, hf in CONFIG_FIELDS[model["family"]].items() if model.get(ours) is not None}
    return AutoConfig.for_model(model["family"], vocab_size=vocab_size, bos_token_id=eod_id, eos_token_id=eod_id,
                                **kwargs)


def last_complete_checkpoint(ckpt_dir: Path, identity: Dict[str, str]) -> Optional[Path]:
    """Newest checkpoint with a completion marker; refuses one made for other data or another model."""
    done = sorted((p for p in ckpt_dir.glob("checkpoint-*") if (p / COMPLETE).is_file()),
                  key=lambda p: int(p.name.split("-")[1]))
    if not done:
        return None
    check_identity(json.loads((done[-1] / COMPLETE).read_text()), identity, done[-1])
    return done[-1]


def check_resumable(ckpt: Path) -> None:
    """DeepSpeed unpickles a checkpoint's ZeRO files in full on resume (they may run code): each is scanned
    for what it imports first, and compared with the sha256 its completion marker records. The Trainer
    reads its own files (rng_state, scheduler, optimizer) with weights_only=True."""
    from pipeline import safeload

    marker = ckpt / COMPLETE
    saved = json.loads(marker.read_text()) if marker.is_file() else {}
    try:
        safeload.check_deepspeed(ckpt, saved.get("sha256") if isinstance(saved, dict) else None, COMPLETE)
    except safeload.ConversionError as e:
        raise SystemExit(str(e)) from None


def check_identity(saved: Dict[str, Any], identity: Dict[str, str], path: Path) -> None:
    """A checkpoint resumes only a run on the same data and model (both backends)."""
    for key, value in identity.items():
        if saved.get(key) != value:
            raise SystemExit(f"{path} was saved for a different {key.replace('_', ' ')} ({saved.get(key)} != "
                             f"{value}); it cannot be resumed here. Use a new run dir or remove {path.parent}")


def build_model(job: Dict[str, Any]):
    """From the init checkpoint (continued pretraining) or from the config (from scratch), seeded."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(job["train"]["seed"])
    if job["init"]:
        return AutoModelForCausalLM.from_pretrained(job["init"], torch_dtype=torch.float32)
    return AutoModelForCausalLM.from_config(model_config(job["model"], job["vocab_size"], job["eod_id"]))


def training_arguments(job: Dict[str, Any], precision: str, cuda: bool, report_to: list):
    """The TrainingArguments the job's settings stand for (bench/train_hf.py uses the same)."""
    from transformers import TrainingArguments

    t = job["train"]
    return TrainingArguments(
        output_dir=str(Path(job["work_dir"]) / "checkpoints"),
        run_name=job["name"],
        per_device_train_batch_size=t["micro_batch_size"],
        per_device_eval_batch_size=t["micro_batch_size"],
        gradient_accumulation_steps=job["grad_accumulation"],
        num_train_epochs=t["epochs"],
        max_steps=t["max_steps"] or -1,
        learning_rate=t["lr"],
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": t["min_lr_ratio"]},
        warmup_steps=t["warmup_ratio"],  # < 1 means a fraction of the run
        weight_decay=t["weight_decay"],
        max_grad_norm=t["grad_clip"],
        eval_strategy="steps",
        eval_steps=t["eval_every"],
        save_strategy="steps",
        save_steps=t["save_every"],
        save_total_limit=t["keep_checkpoints"],
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=t["logging_steps"],
        report_to=report_to,
        seed=t["seed"],
        data_seed=t["seed"],
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not cuda,
        deepspeed=job["deepspeed"] or None,
        dataloader_num_workers=0,
        # every parameter gets a gradient in these models; the default (True) walks the autograd
        # graph again each step: +15% step time on the tiny model (bench/train_hf.py)
        ddp_find_unused_parameters=False,
        disable_tqdm=not (sys.stderr.isatty() or os.environ.get("PIPELINE_TTY")),
    )


def main(job_path: str) -> None:
    rank_dies_with_launch()  # ends with its launcher and with the driver (pipeline/lifetime.py)

    import torch
    import torch.distributed as dist
    from transformers import Trainer, TrainerCallback

    from pipeline.train.blocks import BlockDataset

    job = json.loads(Path(job_path).read_text())
    t, out = job["train"], Path(job["work_dir"])
    ckpt_dir = out / "checkpoints"
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    precision = t["precision"] if t["precision"] != "auto" else ("bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32")
    identity = {"data_fingerprint": job["data_fingerprint"], "model_fingerprint": job["model_fingerprint"]}

    model = build_model(job)
    train_ds = BlockDataset(job["train_prefix"], t["seq_len"])
    valid_ds = BlockDataset(job["valid_prefix"], t["seq_len"])
    tokens_per_step = job["global_batch_tokens"]

    class PipelineCallback(TrainerCallback):
        """Tokens seen and tokens/s in every log; completion markers on checkpoints; the step log file."""

        def __init__(self):
            self.last_time, self.last_step = time.time(), 0

        def on_log(self, args, state, control, logs=None, **kw):
            if logs is None:
                return
            now = time.time()
            logs["tokens_seen"] = state.global_step * tokens_per_step
            if state.global_step > self.last_step:
                logs["tokens_per_second"] = round((state.global_step - self.last_step) * tokens_per_step
                                                  / max(now - self.last_time, 1e-9), 1)
                self.last_time, self.last_step = now, state.global_step
            if state.is_world_process_zero:
                with open(out / LOG, "a") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

        def on_train_begin(self, args, state, control, **kw):
            # The Trainer has loaded the checkpoint's state by now, and with it the old run's logging
            # interval: a how-only key must take effect on resume, so the intervals come from args again.
            state.compute_steps(args, state.max_steps)
            if resume and state.is_world_process_zero:
                print(f"resuming from {resume.name}, step {state.global_step} of {state.max_steps}", flush=True)

        def on_save(self, args, state, control, **kw):
            if dist.is_initialized():
                dist.barrier()  # every rank has written its shards
            if state.is_world_process_zero:
                from pipeline.safeload import file_hashes

                ckpt = ckpt_dir / f"checkpoint-{state.global_step}"
                tmp = ckpt / (COMPLETE + ".tmp")
                # a resume checks what it unpickles against these (check_resumable): corruption
                hashes = file_hashes(ckpt, skip=(COMPLETE, tmp.name))
                tmp.write_text(json.dumps({"step": state.global_step, **identity, "sha256": hashes}))
                os.replace(tmp, ckpt / COMPLETE)

    # swanlab is logged by SwanlabCallback below: transformers 5's own SwanLabCallback calls
    # swanlab.get_run(), which swanlab 0.10 turned from "None if no run" into an exception.
    class SwanlabCallback(TrainerCallback):
        """Rank 0 logs to swanlab; mode=local writes <work_dir>/swanlog, viewed with `swanlab watch`."""

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                import swanlab

                self.run = swanlab.init(project=job["name"], name=job["name"], mode=t["tracker_mode"],
                                        log_dir=str(out / "swanlog"), config={"model": job["model"], "train": t})

        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs:
                self.run.log({k: v for k, v in logs.items() if isinstance(v, (int, float))}, step=state.global_step)

        def finish(self):  # after the final evaluation, which logs past on_train_end
            if getattr(self, "run", None) is not None:
                self.run.finish()

    trackers = {"none": [], "swanlab": [], "wandb": ["wandb"], "tensorboard": ["tensorboard"]}
    swan = SwanlabCallback() if t["tracker"] == "swanlab" else None
    callbacks = [PipelineCallback()] + ([swan] if swan else [])
    args = training_arguments(job, precision, cuda, report_to=trackers[t["tracker"]])
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=valid_ds, callbacks=callbacks)
    if t.get("resume_from"):  # train.resume_from: a chosen checkpoint, checked like the newest one would be
        resume = Path(t["resume_from"])
        if (resume / COMPLETE).is_file():
            check_identity(json.loads((resume / COMPLETE).read_text()), identity, resume)
    else:
        resume = last_complete_checkpoint(ckpt_dir, identity) if ckpt_dir.exists() else None
    if resume:
        check_resumable(resume)  # on every rank, before any of them unpickles it
    if rank == 0 and ckpt_dir.exists():  # checkpoints a kill left half-written are never read
        for p in ckpt_dir.glob("checkpoint-*"):
            if not (p / COMPLETE).is_file():
                shutil.rmtree(p, ignore_errors=True)
    # read now: the checkpoint may be pruned (keep_checkpoints) by the end of the run
    resume_step = json.loads((resume / "trainer_state.json").read_text())["global_step"] if resume else None
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    metrics = trainer.evaluate()
    if swan:
        swan.finish()
    trainer.save_model(str(out / "hf"))  # the best checkpoint's weights (load_best_model_at_end)
    if rank == 0:
        for f in Path(job["tokenizer_dir"]).iterdir():  # every tokenizer file, vocab.json/merges.txt included
            if f.is_file() and f.name not in ("MANIFEST.json", "pipeline_tokenizer.json"):
                shutil.copy2(f, out / "hf" / f.name)
        model.generation_config.save_pretrained(str(out / "hf"))
        summary = {"train_loss": result.training_loss, "eval_loss": metrics["eval_loss"], "steps": trainer.state.global_step,
                   "tokens_seen": trainer.state.global_step * tokens_per_step, "resumed_from": resume.name if resume else None,
                   "resumed_step": resume_step,
                   "best_checkpoint": Path(trainer.state.best_model_checkpoint or "").name or None,
                   "precision": precision, "world_size": int(os.environ.get("WORLD_SIZE", 1))}
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()  # without it gloo's threads abort the process at exit


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
