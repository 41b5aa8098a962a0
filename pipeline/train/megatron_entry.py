"""The megatron backend's per-rank entry point: `torchrun ... megatron_entry.py <job.json>`.

Built from megatron-core's parts, not a copy of Megatron-LM's training script: `GPTModel` with the
local layer spec, megatron-core's DDP and (distributed) optimizer, its pipeline schedules, its
`GPTDataset` over the mixed .bin/.idx and its `dist_checkpointing` (torch_dist) for checkpoints.
Each concern is a module of pipeline/train/mcore/; this script wires them on every rank.

The train stage writes job.json and launches this on every rank; it also runs on its own under any
launcher. Checkpoints follow Megatron-LM's layout (pipeline/train/mcore/checkpoint.py).
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist

from pipeline.formats.checkpoints import iteration_dir
from pipeline.lifetime import rank_dies_with_launch
from pipeline.runner import CHECKPOINTS, SUMMARY
from pipeline.train import tracking
from pipeline.train.checkpoints import resolve_precision
from pipeline.train.job import TrainJob
from pipeline.train.mcore import checkpoint, cpu, data, step
from pipeline.train.mcore import model as models
from pipeline.train.mcore.generate import Sampler
from pipeline.train.per_source import sources_summary
from pipeline.train.throughput import Meter


def main(job_path: str) -> None:
    rank_dies_with_launch()  # ends with its launcher and with the driver (pipeline/lifetime.py)
    tracking.quiet_noise()  # before megatron-core is imported
    job = TrainJob.load(job_path)
    t, par, out = job.train, job.train.parallel, job.out
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:  # CPU (gloo) only: GPU runs never go through the compatibility layer
        cpu.install()
    dist.init_process_group("nccl" if cuda else "gloo")
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import finalize_model_grads

    ps.initialize_model_parallel(par.tp, par.pp, par.vpp)
    tensor_parallel.model_parallel_cuda_manual_seed(t.seed)
    precision = resolve_precision(t.precision)
    config = models.transformer_config(job, precision)
    model = models.build_model(job, config)
    optimizer, scheduler = step.build_optimizer(job, config, model, precision)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = [c.no_sync for c in model] if len(model) > 1 else model[0].no_sync

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    layout = {"tp": par.tp, "pp": par.pp, "vpp": par.vpp, "dp": dp}
    ckpt_root = out / CHECKPOINTS
    iteration, resumed_from = checkpoint.resume(job, ckpt_root, model, optimizer, scheduler, layout)
    resumed_step = iteration if resumed_from else None

    total_steps, global_batch = job.total_steps, job.global_batch_sequences
    num_micro = global_batch // (t.micro_batch_size * dp)
    valid_steps = job.valid_steps  # 0: the valid split holds less than one global batch, no evaluation
    train_ds, valid_ds = data.build_datasets(job, total_steps * global_batch, valid_steps * global_batch)
    train_batches = data.MicroBatches(train_ds, global_batch, t.micro_batch_size, dp_rank, dp)
    valid_batches = data.MicroBatches(valid_ds, global_batch, t.micro_batch_size, dp_rank, dp)
    tokens_per_step = global_batch * t.seq_len
    runlog = tracking.RunLog(job, active=dist.get_rank() == 0)
    runlog.start(total_steps, iteration)
    meter = Meter(job.model, job.padded_vocab_size, t.seq_len, dist.get_world_size(), t.peak_tflops)
    sampler = Sampler(job)
    if sampler.skip and t.sample_prompts and dist.get_rank() == 0:
        print(f"train.sample_prompts: no samples at pp={par.pp} vpp={par.vpp}; generating needs pp=1", flush=True)

    eval_loss, metrics, loss_sum, trained = None, {}, 0.0, 0
    for c in model:
        c.train()
    while iteration < total_steps:
        started = time.time()
        total, grad_norm = step.train_step(model, optimizer, scheduler, train_batches, iteration, num_micro, job)
        iteration += 1
        loss = float(total[0] / total[1])
        loss_sum, trained = loss_sum + loss, trained + 1
        throughput = meter.measure(tokens_per_step, time.time() - started)
        if iteration % t.logging_steps == 0 or iteration == total_steps:
            runlog.train(iteration, loss, optimizer.param_groups[0]["lr"], grad_norm, throughput)
        else:
            runlog.advance(iteration)
        if (iteration % job.eval_every_steps == 0 or iteration == total_steps) and valid_steps:
            metrics = step.evaluate(model, valid_batches, valid_steps, num_micro, job)
            eval_loss = metrics["eval_loss"]
            runlog.eval(iteration, metrics)
            rows = sampler.rows(model)
            if rows is not None:
                runlog.samples(iteration, rows)
        if iteration % job.save_every_steps == 0 or iteration == total_steps:
            progress = {"iteration": iteration, "layout": layout, "args": job.checkpoint_args, **job.identity}
            checkpoint.save_checkpoint(ckpt_root, model, optimizer, scheduler, progress, t.keep_checkpoints)
    if eval_loss is None:  # a resumed run that was already done, or no valid batch (then {})
        metrics = step.evaluate(model, valid_batches, valid_steps, num_micro, job)
        eval_loss = metrics.get("eval_loss")
    if dist.get_rank() == 0:
        # first_loss: of the first step this process trained (after a resume, the step after the checkpoint);
        # no HF model here: the export stage converts the checkpoint
        summary = runlog.summary(
            train_loss=loss_sum / trained if trained else None, eval_loss=eval_loss,
            eval_sources=sources_summary(metrics),
            steps=iteration, tokens_seen=iteration * tokens_per_step, precision=precision,
            world_size=dist.get_world_size(), layout=layout, resumed_from=resumed_from, resumed_step=resumed_step,
            checkpoint=f"{CHECKPOINTS}/{iteration_dir(ckpt_root, iteration).name}", best_checkpoint=None, model=None,
            **{"mfu": None, **meter.summary()})
        (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    runlog.close()
    dist.barrier()
    dist.destroy_process_group()  # without it gloo's threads abort the process at exit


if __name__ == "__main__":  # dist_checkpointing's async writer spawns processes: this guard is required
    from torch.distributed.elastic.multiprocessing.errors import record

    record(main)(sys.argv[-1])  # a failure reaches torchrun's summary with its traceback
