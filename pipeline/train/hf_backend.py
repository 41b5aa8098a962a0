"""The HF backend: transformers.Trainer (+ DeepSpeed ZeRO) over the mixed .bin as seq_len blocks.
pipeline/train/hf_entry.py runs `train` on every rank.

Checkpoints are `checkpoint-<step>/` under the job's work dir; one counts only once its
PIPELINE_COMPLETE.json exists, written by rank 0 after every rank has saved, so a kill during a save
leaves a checkpoint that resume ignores. The marker records every file's sha256. DeepSpeed unpickles
its files in full on resume, so a resume first scans them for what they import (only DeepSpeed's own
classes pass) and checks the recorded hashes (check_resumable).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from pipeline import safeload
from pipeline.data.tokenizer import copy_tokenizer
from pipeline.formats.checkpoints import COMPLETE
from pipeline.models.hf_config import model_config
from pipeline.runner import CHECKPOINTS, HF_MODEL, SUMMARY
from pipeline.train import tracking
from pipeline.train.blocks import BlockDataset
from pipeline.train.checkpoints import check_identity, remove_half_written, resolve_precision
from pipeline.train.job import TrainJob
from pipeline.train.passthrough import field_names, with_hf_args
from pipeline.train.per_source import eval_metrics, sources_summary
from pipeline.train.throughput import Meter

# train.attention -> transformers' attn_implementation
ATTENTION = {"sdpa": "sdpa", "eager": "eager", "flash": "flash_attention_2"}


def last_complete_checkpoint(ckpt_dir: Path, identity: Dict[str, str]) -> Optional[Path]:
    """Newest checkpoint with a completion marker; refuses one made for other data or another model."""
    done = sorted((p for p in ckpt_dir.glob("checkpoint-*") if (p / COMPLETE).is_file()),
                  key=lambda p: int(p.name.split("-")[1]))
    if not done:
        return None
    check_identity(json.loads((done[-1] / COMPLETE).read_text()), identity, done[-1])
    return done[-1]


def last_checkpoint(ckpt_dir: Path) -> Optional[str]:
    """The newest complete checkpoint, relative to the work dir (train_summary.json)."""
    done = [p for p in ckpt_dir.glob("checkpoint-*") if (p / COMPLETE).is_file()]
    newest = max(done, key=lambda p: int(p.name.split("-")[1]), default=None)
    return f"{CHECKPOINTS}/{newest.name}" if newest else None


def check_resumable(ckpt: Path) -> None:
    """DeepSpeed unpickles a checkpoint's ZeRO files in full on resume (they may run code): each is scanned
    for what it imports first, and compared with the sha256 its completion marker records. The Trainer
    reads its own files (rng_state, scheduler, optimizer) with weights_only=True."""
    marker = ckpt / COMPLETE
    saved = json.loads(marker.read_text()) if marker.is_file() else {}
    try:
        safeload.check_deepspeed(ckpt, saved.get("sha256") if isinstance(saved, dict) else None, COMPLETE)
    except safeload.ConversionError as e:
        raise SystemExit(str(e)) from None


def block_inputs(block, eod: int, document_mask: bool, eod_mask_loss: bool) -> dict:
    """The model's inputs for one block of the token stream. With document_mask, position ids restart
    after each EOD, as megatron-core's GPTDataset resets them, and no attention_mask is given:
    transformers then finds the packed documents from the position ids (find_packed_sequence_indices)
    and gives sdpa/eager a block-diagonal causal mask. Blocks without an EOD keep sdpa's plain causal
    path. eod_mask_loss drops the loss where the input is EOD (Megatron's loss_mask); labels are the
    inputs, which the model shifts, so that is the label after each EOD."""
    import torch

    after_eod = torch.zeros_like(block, dtype=torch.bool)
    after_eod[1:] = block[:-1] == eod
    item = {"input_ids": block, "labels": block.masked_fill(after_eod, -100) if eod_mask_loss else block}
    if document_mask:
        index = torch.arange(block.shape[0])
        item["position_ids"] = index - torch.where(after_eod, index, 0).cummax(0).values
    return item


def collate(features: list) -> dict:
    """The Trainer's default collator, and no KV cache: with one (the config's use_cache), transformers
    skips the packed-document detection above, and a training forward never reads a cache anyway."""
    from transformers import default_data_collator

    return {**default_data_collator(features), "use_cache": False}


class DocumentBlocks(BlockDataset):
    """BlockDataset's blocks as block_inputs gives them to the model."""

    def __init__(self, prefix, job: TrainJob):
        super().__init__(prefix, job.train.seq_len)
        self.eod, self.document_mask, self.eod_mask_loss = job.eod_id, job.train.document_mask, job.train.eod_mask_loss

    def __getitem__(self, i: int) -> dict:
        return block_inputs(super().__getitem__(i)["input_ids"], self.eod, self.document_mask, self.eod_mask_loss)


class SourcedBlocks(DocumentBlocks):
    """The validation blocks, each with its tokens' source indices: block i of the valid.sources stream
    (pipeline/data/mix.py) beside block i of valid.bin. Without a stream every token is source 0."""

    def __init__(self, prefix, job: TrainJob, source_ids: Optional[str] = None):
        super().__init__(prefix, job)
        self.source_ids = BlockDataset(source_ids, job.train.seq_len) if source_ids else None

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        tokens = item["input_ids"]
        ids = self.source_ids[i]["input_ids"] if self.source_ids else tokens.new_zeros(tokens.shape)
        return {**item, "sources": ids}


def source_losses(logits, labels, sources, n_sources: int):
    """Per block [1 + n_sources, 2] float64: the loss sum and the token count over its predicted tokens
    (row 0) and over those of each source (row 1 + s). A token's loss is the model's own (cross entropy
    against the next label, -100 ignored, as transformers' ForCausalLMLoss shifts it), counted under the
    source of that label's document; so row 0 is exactly the sum of the others."""
    import torch
    import torch.nn.functional as F

    target, src = labels[:, 1:], sources[:, 1:].long()
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, ignore_index=-100,
                             reduction="none").double()
    counted = (target != -100).double()[..., None]
    rows = torch.cat([torch.ones_like(src)[..., None], F.one_hot(src, n_sources)], -1).double() * counted
    return torch.stack([torch.einsum("bt,bts->bs", losses, rows), rows.sum(1)], -1)


def sourced_trainer(names: list):
    """The Trainer, its evaluation token-weighted (one sum over every evaluated token, not a mean of
    batch means) and split by source: eval_loss and eval_loss/<source> from the same per-token losses
    (source_losses), gathered across ranks by the Trainer (which drops the samples it repeated)."""
    import torch
    from transformers import Trainer

    n_sources = max(len(names), 1)

    class SourcedTrainer(Trainer):
        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            self._signature_columns.append("sources")  # kept by the Trainer's column filter, popped below

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            sources = inputs.pop("sources")
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                logits = model(**inputs).logits
            stats = source_losses(logits, inputs["labels"], sources.to(logits.device), n_sources)
            return (stats[:, 0, 0].sum() / stats[:, 0, 1].sum()).float(), stats, None

        def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                            metric_key_prefix="eval"):
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            output.metrics.update(eval_metrics(output.predictions.sum(0), names, metric_key_prefix))
            return output

    return SourcedTrainer


def generate(model, tokenizer, prompts: list, max_new_tokens: int, samples: int = 1, temperature: float = 0.0,
             synced: bool = False) -> list:
    """`samples` continuations of each prompt, greedy at temperature 0; rows {prompt, sample, text}.
    synced: every rank runs it (ZeRO-3 gathers the parameters collectively)."""
    import torch

    was_training = model.training
    model.eval()
    rows = []
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 num_return_sequences=samples, pad_token_id=tokenizer.pad_token_id,
                                 synced_gpus=synced, **sampling)
        rows += [{"prompt": prompt, "sample": k, "text": tokenizer.decode(o[ids.shape[1]:], skip_special_tokens=True)}
                 for k, o in enumerate(out)]
    model.train(was_training)
    return rows


def samples_callback(job: TrainJob, runlog: tracking.RunLog):
    """At each evaluation: greedy continuations of train.sample_prompts, appended by rank 0 to
    <train>/samples.jsonl (with the step) and logged to the tracker as text (runlog: tracking.RunLog)."""
    import torch.distributed as dist
    from transformers import AutoTokenizer, TrainerCallback

    tokenizer = AutoTokenizer.from_pretrained(job.tokenizer_dir)
    synced = job.train.zero_stage == 3 and dist.is_initialized() and dist.get_world_size() > 1

    class SamplesCallback(TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, **kw):
            if not (synced or state.is_world_process_zero):
                return
            rows = generate(model, tokenizer, job.train.sample_prompts, job.train.sample_tokens, synced=synced)
            runlog.samples(state.global_step, rows)  # rank 0's RunLog writes them

    return SamplesCallback()


def build_model(job: Union[TrainJob, Mapping]):
    """From the init checkpoint (continued pretraining) or from the config (from scratch), seeded."""
    import torch
    from transformers import AutoModelForCausalLM

    job = TrainJob.of(job)
    torch.manual_seed(job.train.seed)
    attention = ATTENTION[job.train.attention]
    if job.init:
        return AutoModelForCausalLM.from_pretrained(job.init, torch_dtype=torch.float32, attn_implementation=attention)
    return AutoModelForCausalLM.from_config(model_config(job.model, job.vocab_size, job.eod_id),
                                            attn_implementation=attention)


def training_arguments(job: Union[TrainJob, Mapping], precision: str, cuda: bool, report_to: list):
    """The TrainingArguments the job's settings stand for (bench/train_hf.py uses the same), train.hf_args
    last (pipeline/train/passthrough.py)."""
    from transformers import TrainingArguments

    job = TrainJob.of(job)
    return TrainingArguments(**with_hf_args(pipeline_arguments(job, precision, cuda, report_to), job.train.hf_args))


def pipeline_arguments(job: TrainJob, precision: str, cuda: bool, report_to: list) -> Dict[str, Any]:
    """The TrainingArguments the pipeline's own keys set (passthrough.HF_OWNED names them, but for the
    defaults hf_args may replace)."""
    from transformers import TrainingArguments

    t = job.train
    beta1, beta2, eps = t.adam
    recompute = t.recompute == "full"  # whole layers; selective is refused for this backend (config.py)
    # transformers 5.25 renamed gradient checkpointing (the old name warns); earlier 5.x have only the old
    checkpointing = next(name for name in ("activation_checkpointing", "gradient_checkpointing")
                         if name in field_names(TrainingArguments))
    return dict(
        output_dir=str(job.out / CHECKPOINTS),
        run_name=job.name,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=job.grad_accumulation,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": t.min_lr_ratio},
        warmup_steps=t.warmup_ratio,  # < 1 means a fraction of the run
        weight_decay=t.weight_decay,
        adam_beta1=beta1,
        adam_beta2=beta2,
        adam_epsilon=eps,
        max_grad_norm=t.grad_clip,
        # non-reentrant: needs no input that requires grad, and DDP sees each parameter once
        **{checkpointing: recompute, f"{checkpointing}_kwargs": {"use_reentrant": False} if recompute else None},
        eval_strategy="steps",
        eval_steps=t.eval_every,
        save_strategy="steps",
        save_steps=t.save_every,
        # the Trainer prunes to the newest keep_checkpoints itself, and keeps the best by eval loss too
        save_total_limit=t.keep_checkpoints,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=t.logging_steps,
        report_to=report_to,
        seed=t.seed,
        data_seed=t.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not cuda,
        deepspeed=job.deepspeed or None,
        dataloader_num_workers=0,
        # every parameter gets a gradient in these models; the default (True) walks the autograd
        # graph again each step: +15% step time on the tiny model (bench/train_hf.py)
        ddp_find_unused_parameters=False,
        disable_tqdm=True,  # the progress bar and the printed logs are tracking.RunLog's
    )


def pipeline_callback(job: TrainJob):
    """Completion markers on checkpoints, and each log (a train step or an evaluation) to rank 0's
    tracking.RunLog (`runlog`: the step log file, the tracker, the progress bar or the JSON lines).
    Its `resume` is the checkpoint the run resumes from, set once chosen."""
    import torch.distributed as dist
    from transformers import TrainerCallback

    tokens_per_step, ckpt_dir = job.global_batch_tokens, job.out / CHECKPOINTS

    class PipelineCallback(TrainerCallback):
        def __init__(self):
            self.last_time, self.last_step = time.time(), 0
            self.resume: Optional[Path] = None
            self.meter = Meter(job.model, job.vocab_size, job.train.seq_len, int(os.environ.get("WORLD_SIZE", 1)),
                               job.train.peak_tflops)
            self.runlog = tracking.RunLog(job, active=int(os.environ.get("RANK", "0")) == 0)

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs:
                return
            if "loss" in logs:  # a train step; the run's closing log (train_runtime, ...) goes to the summary
                now, throughput = time.time(), {}
                if state.global_step > self.last_step:
                    throughput = self.meter.measure((state.global_step - self.last_step) * tokens_per_step,
                                                    now - self.last_time)
                    self.last_time, self.last_step = now, state.global_step
                self.runlog.train(state.global_step, logs["loss"], logs.get("learning_rate"), logs.get("grad_norm"),
                                  throughput)
            elif "eval_loss" in logs:
                self.runlog.eval(state.global_step, logs)

        def on_train_begin(self, args, state, control, **kw):
            # The Trainer has loaded the checkpoint's state by now, and with it the old run's logging
            # interval: a how-only key must take effect on resume, so the intervals come from args again.
            state.compute_steps(args, state.max_steps)
            if self.resume and state.is_world_process_zero:
                print(f"resuming from {self.resume.name}, step {state.global_step} of {state.max_steps}", flush=True)
            self.runlog.start(state.max_steps, state.global_step)

        def on_step_end(self, args, state, control, **kw):
            self.runlog.advance(state.global_step)

        def on_save(self, args, state, control, **kw):
            if dist.is_initialized():
                dist.barrier()  # every rank has written its shards
            if state.is_world_process_zero:
                ckpt = ckpt_dir / f"checkpoint-{state.global_step}"
                tmp = ckpt / (COMPLETE + ".tmp")
                # a resume checks what it unpickles against these (check_resumable): corruption
                hashes = safeload.file_hashes(ckpt, skip=(COMPLETE, tmp.name))
                tmp.write_text(json.dumps({"step": state.global_step, **job.identity, "sha256": hashes}))
                os.replace(tmp, ckpt / COMPLETE)

    return PipelineCallback()


def choose_resume(job: TrainJob, ckpt_dir: Path) -> Optional[Path]:
    """train.resume_from (checked like the newest would be), else the newest complete checkpoint."""
    if job.train.resume_from:
        resume = Path(job.train.resume_from)
        if (resume / COMPLETE).is_file():
            check_identity(json.loads((resume / COMPLETE).read_text()), job.identity, resume)
        return resume
    return last_complete_checkpoint(ckpt_dir, job.identity) if ckpt_dir.exists() else None


def train(job: TrainJob) -> None:
    """This rank's part of the run: train, evaluate, save the best model and (rank 0) the summary."""
    import torch
    import torch.distributed as dist
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    tracking.quiet_noise()
    t, out = job.train, job.out
    ckpt_dir = out / CHECKPOINTS
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    precision = resolve_precision(t.precision)

    model = build_model(job)
    train_ds = DocumentBlocks(job.train_prefix, job)
    valid_ds = SourcedBlocks(job.valid_prefix, job, job.valid_source_ids)
    tokens_per_step = job.global_batch_tokens
    progress = pipeline_callback(job)
    callbacks = [progress]
    if t.sample_prompts:
        callbacks.append(samples_callback(job, progress.runlog))
    # every tracker is logged by progress.runlog (pipeline/train/tracking.py), not by the Trainer's own callbacks
    args = training_arguments(job, precision, cuda, report_to=[])
    trainer = sourced_trainer(job.valid_sources)(model=model, args=args, data_collator=collate, train_dataset=train_ds,
                                                 eval_dataset=valid_ds, callbacks=callbacks)
    for printer in (PrinterCallback, ProgressCallback):  # they print each log as a dict: RunLog shows it
        trainer.remove_callback(printer)
    resume = progress.resume = choose_resume(job, ckpt_dir)
    if resume:
        check_resumable(resume)  # on every rank, before any of them unpickles it
    if rank == 0:  # checkpoints a kill left half-written are never read
        remove_half_written(ckpt_dir, "hf")
    # read now: the checkpoint may be pruned (keep_checkpoints) by the end of the run
    resume_step = json.loads((resume / "trainer_state.json").read_text())["global_step"] if resume else None
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    metrics = trainer.evaluate()
    trainer.save_model(str(out / HF_MODEL))  # the best checkpoint's weights (load_best_model_at_end)
    if rank == 0:
        copy_tokenizer(job.tokenizer_dir, out / HF_MODEL, model_max_length=t.seq_len)  # portable, 4.x and 5.x
        model.generation_config.save_pretrained(str(out / HF_MODEL))
        world = int(os.environ.get("WORLD_SIZE", 1))
        best = Path(trainer.state.best_model_checkpoint or "").name or None
        summary = progress.runlog.summary(
            train_loss=result.training_loss, eval_loss=metrics["eval_loss"], eval_sources=sources_summary(metrics),
            steps=trainer.state.global_step, tokens_seen=trainer.state.global_step * tokens_per_step,
            precision=precision, world_size=world, layout={"dp": world}, resumed_from=resume.name if resume else None,
            resumed_step=resume_step, checkpoint=last_checkpoint(ckpt_dir), best_checkpoint=best, model=HF_MODEL,
            **{"mfu": None, **progress.meter.summary()})
        (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    progress.runlog.close()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()  # without it gloo's threads abort the process at exit
