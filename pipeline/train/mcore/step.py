"""The megatron backend's steps: optimizer and LR schedule, one micro batch's forward and loss, a global
batch through megatron-core's pipeline schedule (train or eval). What is logged: pipeline/train/tracking.py."""
from __future__ import annotations

from functools import partial
from typing import Dict, List

import torch
import torch.distributed as dist

from pipeline.train.job import TrainJob
from pipeline.train.mcore.data import MicroBatches
from pipeline.train.mcore.model import uses_te
from pipeline.train.passthrough import fields_of
from pipeline.train.per_source import eval_metrics


def build_optimizer(job: TrainJob, config, model: List[torch.nn.Module], precision: str):
    """megatron-core's (distributed) Adam and Megatron-LM's schedule: cosine from lr to lr x min_lr_ratio
    after a linear warmup; steps here are optimizer steps. train.megatron_args entries that are
    OptimizerConfig fields go last."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t = job.train
    beta1, beta2, eps = t.adam
    optimizer = get_megatron_optimizer(OptimizerConfig(**{**dict(
        optimizer="adam", lr=t.lr, min_lr=t.lr * t.min_lr_ratio, weight_decay=t.weight_decay,
        adam_beta1=beta1, adam_beta2=beta2, adam_eps=eps, clip_grad=t.grad_clip, bf16=precision == "bf16",
        fp16=precision == "fp16", params_dtype=config.params_dtype,
        use_distributed_optimizer=t.parallel.distributed_optimizer), **fields_of(OptimizerConfig, t.megatron_args)}),
        model)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.lr * t.min_lr_ratio, lr_warmup_steps=job.warmup_steps,
        lr_decay_steps=job.total_steps, lr_decay_style="cosine", start_wd=t.weight_decay, end_wd=t.weight_decay,
        wd_incr_steps=job.total_steps, wd_incr_style="constant")
    return optimizer, scheduler


def model_inputs(batch: Dict[str, torch.Tensor], packed: bool) -> Dict:
    """GPTModel's arguments for a GPTDataset micro batch. The local layer spec (CPU, or a GPU without TE)
    applies the dataset's [b, 1, s, s] mask as it is, document boundaries included. TE's causal attention
    ignores any mask (Megatron-LM issue 2357), so `packed` (document_mask under TE) hands TE the micro
    batch as one packed THD row instead, a sequence starting wherever a position id is 0 (every sample's
    first token, every token after an EOD): TE's varlen attention and RoPE then restart at each."""
    if not packed:
        return {"input_ids": batch["tokens"], "position_ids": batch["position_ids"],
                "attention_mask": batch["attention_mask"]}
    from megatron.core.packed_seq_params import PackedSeqParams

    positions = batch["position_ids"].reshape(1, -1)
    starts = (positions[0] == 0).nonzero().view(-1)
    cu_seqlens = torch.cat([starts, starts.new_tensor([positions.shape[1]])]).to(torch.int32)
    longest = int(cu_seqlens.diff().max())
    return {"input_ids": batch["tokens"].reshape(1, -1), "position_ids": positions, "attention_mask": None,
            "packed_seq_params": PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                                                 max_seqlen_q=longest, max_seqlen_kv=longest)}


def forward_step(data_iterator, model, *, packed: bool = False, n_sources: int = 0):
    """One micro batch through this chunk; the loss closure runs on the last pipeline stage. With
    n_sources (evaluation), its report is per_source's table flattened, in float64, from the batch's
    `sources` (data.Sourced)."""
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    batch = {k: v.to(device) for k, v in next(data_iterator).items()}
    inputs = model_inputs(batch, packed)
    output = model(**inputs, labels=batch["labels"].reshape(inputs["input_ids"].shape))

    def loss_func(output_tensor):
        mask = batch["loss_mask"].float().view(-1)
        loss_sum = (output_tensor.float().view(-1) * mask).sum()
        tokens = mask.sum().to(torch.int)
        if not n_sources:
            return loss_sum, tokens, {"lm loss": torch.stack([loss_sum.detach(), tokens.float()])}
        counted = torch.stack([output_tensor.detach().double().view(-1) * mask, mask.double()], -1)
        by_source = counted.new_zeros(n_sources, 2).index_add_(0, batch["sources"].view(-1), counted)
        table = torch.cat([counted.sum(0, keepdim=True), by_source])
        return loss_sum, tokens, {"lm loss": table.view(-1)}

    return output, loss_func


def run_batches(model, batches, num_microbatches: int, job: TrainJob, forward_only: bool,
                n_sources: int = 0) -> torch.Tensor:
    """forward(+backward) of one global batch through the pipeline schedule; returns [loss sum, tokens]
    (with n_sources: forward_step's table, flattened) summed over the whole world (every rank gets the
    same numbers)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iterators = batches if len(model) > 1 else batches[0]
    packed = job.train.document_mask and uses_te()
    mbs, seq = job.train.micro_batch_size, job.train.seq_len
    shape = dict(seq_length=mbs * seq, micro_batch_size=1) if packed else dict(seq_length=seq, micro_batch_size=mbs)
    losses = get_forward_backward_func()(  # the P2P shapes between pipeline stages follow the packed row
        forward_step_func=partial(forward_step, packed=packed, n_sources=n_sources), data_iterator=iterators,
        model=model if len(model) > 1 else model[0], num_microbatches=num_microbatches, forward_only=forward_only,
        **shape)
    total = torch.zeros(2 * (1 + n_sources), dtype=torch.float64)
    for item in losses:  # only the last pipeline stage has them
        total += item["lm loss"].double().cpu()
    # every tensor-parallel rank of the last stage holds the same numbers: count them once
    if ps.get_tensor_model_parallel_rank() != 0:
        total.zero_()
    dist.all_reduce(total)
    return total


def train_step(model, optimizer, scheduler, batches: MicroBatches, step: int, num_micro: int, job: TrainJob):
    """One optimizer step on global batch `step`; returns ([loss sum, tokens], grad norm)."""
    for c in model:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    # each chunk walks the same micro batches: the schedule feeds the first (and, for labels, the last)
    total = run_batches(model, [batches.batch(step) for _ in model], num_micro, job, False)
    updated, grad_norm, _ = optimizer.step()
    if updated:  # an fp16 overflow skips the step, and the schedule waits with it (as Megatron-LM does)
        scheduler.step(increment=1)
    return total, grad_norm


def evaluate(model, batches: MicroBatches, steps: int, num_micro: int, job: TrainJob) -> Dict[str, float]:
    """Over the first `steps` global batches of the valid split: the loss per token (eval_loss) and, with
    the mix's source stream, each source's (per_source.eval_metrics); {} for no steps."""
    if not steps:
        return {}
    for c in model:
        c.eval()
    names = job.valid_sources if job.valid_source_ids else []
    total = torch.zeros(2 * (1 + len(names)), dtype=torch.float64)
    with torch.no_grad():
        for step in range(steps):
            total += run_batches(model, [batches.batch(step) for _ in model], num_micro, job, True, len(names))
    for c in model:
        c.train()
    return eval_metrics(total.view(-1, 2), names)
