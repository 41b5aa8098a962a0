"""The megatron backend's per-rank entry point: `torchrun ... megatron_entry.py <job.json>`.

Built from megatron-core's parts, not a copy of Megatron-LM's training script: `GPTModel` with the
local layer spec, megatron-core's DDP and (distributed) optimizer, its pipeline schedules, its
`GPTDataset` over the mixed .bin/.idx and its `dist_checkpointing` (torch_dist) for checkpoints.

The train stage writes job.json and launches this on every rank; it also runs on its own under any
launcher. Checkpoints follow Megatron-LM's layout:
    checkpoints/iter_0000040/                  torch_dist: model, optimizer, scheduler, RNG, progress
    checkpoints/latest_checkpointed_iteration.txt   written by rank 0 after every rank has saved
A checkpoint counts only once the tracker file names it, so a kill during a save leaves a directory
that resume ignores (and removes). torch_dist stores global tensors, so a checkpoint saved at one
TP/PP/DP layout resumes at another.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from pipeline.lifetime import rank_dies_with_launch
from pipeline.train.checkpoints import TRACKER
LOG = "train_log.jsonl"  # one JSON line per logged step, rank 0, appended across resumes

# What each family is in megatron-core terms (TransformerConfig fields + GPTModel arguments).
# gpt2 uses the tanh GELU ("gelu_new") so its logits match the HF model after conversion.
FAMILIES = {
    "llama": dict(normalization="RMSNorm", gated_linear_unit=True, activation="silu", add_bias_linear=False,
                  add_qkv_bias=False, position_embedding_type="rope"),
    "qwen2": dict(normalization="RMSNorm", gated_linear_unit=True, activation="silu", add_bias_linear=False,
                  add_qkv_bias=True, position_embedding_type="rope"),
    "gpt2": dict(normalization="LayerNorm", gated_linear_unit=False, activation="gelu_tanh", add_bias_linear=True,
                 add_qkv_bias=True, position_embedding_type="learned_absolute"),
}
ACTIVATIONS = {"silu": torch.nn.functional.silu,
               "gelu_tanh": partial(torch.nn.functional.gelu, approximate="tanh")}


def padded_vocab_size(vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron pads the embedding to a multiple of make_vocab_size_divisible_by x TP."""
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


def ffn_size(model: Dict[str, Any]) -> int:
    return model["ffn_hidden_size"] or 4 * model["hidden_size"]


def transformer_config(job: Dict[str, Any], precision: str):
    from megatron.core.transformer import TransformerConfig

    model, par, fam = job["model"], job["train"]["parallel"], FAMILIES[job["model"]["family"]]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    recompute = {"none": {}, "selective": dict(recompute_granularity="selective"),
                 "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)}
    return TransformerConfig(
        num_layers=model["num_layers"],
        hidden_size=model["hidden_size"],
        num_attention_heads=model["num_attention_heads"],
        num_query_groups=model["num_key_value_heads"] or model["num_attention_heads"],
        ffn_hidden_size=ffn_size(model),
        normalization=fam["normalization"],
        layernorm_epsilon=model["norm_eps"],
        gated_linear_unit=fam["gated_linear_unit"],
        activation_func=ACTIVATIONS[fam["activation"]],
        add_bias_linear=fam["add_bias_linear"],
        add_qkv_bias=fam["add_qkv_bias"],
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        tensor_model_parallel_size=par["tp"],
        pipeline_model_parallel_size=par["pp"],
        virtual_pipeline_model_parallel_size=par["vpp"],
        sequence_parallel=par["sequence_parallel"],
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # the fused kernels are CUDA/apex/TE only; on a GPU megatron-core picks them when they exist
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        # the interleaved schedule's P2P as Megatron-LM sets it: overlapped, unbatched. Batched, two
        # pipeline ranks exchange activations and gradients over one pair in mismatched order
        overlap_p2p_comm=par["vpp"] is not None,
        batch_p2p_comm=par["vpp"] is None,
        **recompute[par["recompute"]],
    )


def layer_spec(normalization: str):
    """Transformer Engine's fused layers where TE and a GPU are present (Megatron-LM's default),
    megatron-core's local layers otherwise. The local spec maps its norm names onto TE's, so both
    save the same checkpoint keys."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if torch.cuda.is_available() and specs.HAVE_TE:
        return specs.get_gpt_layer_with_transformer_engine_spec()
    return specs.get_gpt_layer_local_spec(normalization=normalization)


def build_model(job: Dict[str, Any], config) -> List[torch.nn.Module]:
    """One GPTModel chunk per virtual pipeline stage of this rank, each wrapped in megatron-core's DDP."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel

    model, fam = job["model"], FAMILIES[job["model"]["family"]]
    spec = layer_spec(fam["normalization"])
    vpp = job["train"]["parallel"]["vpp"]
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        chunk = GPTModel(
            config=config, transformer_layer_spec=spec, vocab_size=job["padded_vocab_size"],
            max_sequence_length=model["max_position_embeddings"],
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=model["tie_word_embeddings"],
            position_embedding_type=fam["position_embedding_type"], rotary_base=int(model["rope_theta"]),
            vp_stage=stage)
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=job["train"]["parallel"]["distributed_optimizer"])
        # chunks after the first own no bucket of the first's: megatron-LM disables bucketing there too
        chunks.append(DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                              disable_bucketing=vp_stage > 0))
    return chunks


class _TokenizerInfo:
    """What GPTDataset needs of a tokenizer: the EOD id (for masks) and the vocabulary size."""

    def __init__(self, eod: int, vocab_size: int):
        self.eod, self.vocab_size, self.unique_identifiers = eod, vocab_size, {"eod": eod, "vocab": vocab_size}


def build_datasets(job: Dict[str, Any], train_samples: int, valid_samples: int):
    """megatron-core's GPTDataset over the mixed train/valid .bin/.idx (one blend entry per split).
    A split asked for more samples than it holds is walked again in a new shuffled order."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    t = job["train"]
    config = GPTDatasetConfig(
        random_seed=t["seed"], sequence_length=t["seq_len"],
        blend_per_split=[([job["train_prefix"]], None), ([job["valid_prefix"]], None) if valid_samples else None, None],
        tokenizer=_TokenizerInfo(job["eod_id"], job["vocab_size"]),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=True,  # an explicit causal mask: megatron's default one is built on CUDA
        path_to_cache=str(Path(job["work_dir"]) / "dataset_cache"),
    )
    # every rank reads its own micro batches; rank 0 builds the index caches first, the others then load them
    build = BlendedMegatronDatasetBuilder(GPTDataset, [train_samples, valid_samples, 0], lambda: True, config).build
    if dist.get_rank() == 0:
        train, valid, _ = build()
    dist.barrier()
    if dist.get_rank() != 0:
        train, valid, _ = build()
    return train, valid


class MicroBatches:
    """This rank's micro batches of a global batch: Megatron's pretraining sampler order.

    Global batch `step` holds samples [step*G, (step+1)*G); micro batch m gives data-parallel rank r
    the samples step*G + m*(mbs*dp) + r*mbs + [0, mbs). The position is the step, so resume is exact.
    """

    def __init__(self, dataset, global_batch: int, micro_batch: int, dp_rank: int, dp: int):
        self.dataset, self.global_batch = dataset, global_batch
        self.micro_batch, self.dp_rank, self.dp = micro_batch, dp_rank, dp

    def batch(self, step: int):
        """An iterator over this rank's micro batches of global batch `step`."""
        start = step * self.global_batch + self.dp_rank * self.micro_batch
        for m in range(self.global_batch // (self.micro_batch * self.dp)):
            first = start + m * self.micro_batch * self.dp
            samples = [self.dataset[i] for i in range(first, first + self.micro_batch)]
            yield {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def forward_step(data_iterator, model):
    """One micro batch through this chunk; the loss closure runs on the last pipeline stage."""
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    batch = {k: v.to(device) for k, v in next(data_iterator).items()}
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])

    def loss_func(output_tensor):
        mask = batch["loss_mask"].float().view(-1)
        loss_sum = (output_tensor.float().view(-1) * mask).sum()
        tokens = mask.sum().to(torch.int)
        return loss_sum, tokens, {"lm loss": torch.stack([loss_sum.detach(), tokens.float()])}

    return output, loss_func


def run_batches(model, batches, num_microbatches: int, job, forward_only: bool) -> torch.Tensor:
    """forward(+backward) of one global batch through the pipeline schedule; returns [loss sum, tokens]
    summed over the whole world (every rank gets the same numbers)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    t = job["train"]
    iterators = batches if len(model) > 1 else batches[0]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators, model=model if len(model) > 1 else model[0],
        num_microbatches=num_microbatches, seq_length=t["seq_len"], micro_batch_size=t["micro_batch_size"],
        forward_only=forward_only)
    total = torch.zeros(2, dtype=torch.float64)
    for item in losses:  # only the last pipeline stage has them
        total += item["lm loss"].double().cpu()
    # every tensor-parallel rank of the last stage holds the same numbers: count them once
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_rank() != 0:
        total.zero_()
    dist.all_reduce(total)
    return total


# ----------------------------------------------------------------------------- checkpoints

def sharded_state(model, optimizer, scheduler, progress: Dict[str, Any], with_rng: bool, is_loading: bool):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state: Dict[str, Any] = {}
    for i, chunk in enumerate(model):
        state["model" if len(model) == 1 else f"model{i}"] = chunk.module.sharded_state_dict()
    model_state = {k: v for k, v in state.items() if k.startswith("model")}
    if optimizer is not None:
        # fully_reshardable: the optimizer state loads at any TP/PP/DP layout (Megatron-LM's
        # --dist-ckpt-optim-fully-reshardable); the default (dp_reshardable) only allows a new DP size
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"})
        state["opt_param_scheduler"] = scheduler.state_dict()
    state.update(progress)  # plain values: dist_checkpointing keeps them in the common state
    if with_rng:  # per (pp, tp) rank; only restored at the same layout
        rng = {"random": __import__("random").getstate(), "torch": torch.get_rng_state(),
               "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        pp, tp = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
        state["rng_state"] = ShardedObject("rng_state", rng, (pp, tp), (ps.get_pipeline_model_parallel_rank(),
                                                                         ps.get_tensor_model_parallel_rank()),
                                           replica_id=ps.get_data_parallel_rank(with_context_parallel=True))
    return state


def iteration_dir(ckpt_root: Path, iteration: int) -> Path:
    return ckpt_root / f"iter_{iteration:07d}"


def latest_iteration(ckpt_root: Path) -> Optional[int]:
    tracker = ckpt_root / TRACKER
    return int(tracker.read_text().strip()) if tracker.is_file() else None


@functools.lru_cache(maxsize=None)  # the stage asks for it twice before launch
def read_checkpoint_args(ckpt_root: Path) -> Dict[str, Any]:
    """The `args` a checkpoint of this backend stores (model, vocab sizes), from its newest iteration."""
    from pipeline.safeload import COMMON_FILE, safe_torch_load

    latest = latest_iteration(ckpt_root)
    if latest is None:
        raise FileNotFoundError(f"no {TRACKER} in {ckpt_root}")
    return safe_torch_load(iteration_dir(ckpt_root, latest) / COMMON_FILE)["args"]


def save_checkpoint(ckpt_root: Path, model, optimizer, scheduler, progress: Dict[str, Any], keep: int) -> None:
    from megatron.core import dist_checkpointing

    iteration = progress["iteration"]
    path = iteration_dir(ckpt_root, iteration)
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(sharded_state(model, optimizer, scheduler, progress, True, False), str(path))
    dist.barrier()  # every rank has written its shards
    if dist.get_rank() == 0:
        tmp = ckpt_root / (TRACKER + ".tmp")
        tmp.write_text(str(iteration))
        os.replace(tmp, ckpt_root / TRACKER)
        done = sorted(int(p.name[5:]) for p in ckpt_root.glob("iter_*"))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(iteration_dir(ckpt_root, old), ignore_errors=True)
    dist.barrier()


def materialise_adam_state(optimizer) -> None:
    """torch's Adam creates its state on the first step, but megatron's DistributedOptimizer reads
    `step` from it when building the state dict a checkpoint loads into; fill a fresh optimizer's state
    with what its first step would start from (the checkpoint then overwrites it). TE's and apex's
    fused Adam, used when installed, keep `step` elsewhere and never reach this."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p.data),
                                          exp_avg_sq=torch.zeros_like(p.data))


def fix_torch_adam_reshard_load() -> None:
    """megatron-core 0.16.1, with torch's Adam (no TE/apex installed): loading a fully_reshardable
    optimizer checkpoint copies every key of the live Adam state, `step` included, from the
    checkpoint's per-parameter tensors, which carry no `step` (it travels in the param groups, and
    load_state_dict has already set it): KeyError 'step'. Hand the live `step` through unchanged."""
    from megatron.core.optimizer import distrib_optimizer as dopt

    if dopt.HAVE_APEX_OR_TE or getattr(dopt.DistributedOptimizer, "_step_fix", False):
        return
    original = dopt.DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        live = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        if "step" in live and "step" not in tensors:
            # load_state_dict gave every parameter the same `step` tensor; Adam increments it in place
            # once per parameter, so each needs its own
            live["step"] = live["step"].clone()
            tensors = {**tensors, "step": live["step"]}
        return original(self, model_param, tensors)

    dopt.DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    dopt.DistributedOptimizer._step_fix = True


def load_checkpoint(path: Path, model, optimizer, scheduler, layout: Dict[str, int]) -> Dict[str, Any]:
    """Restore a checkpoint into this layout; returns its common state (progress, args, identity).
    With optimizer=None only the model weights are read (an init checkpoint)."""
    import random

    from megatron.core import dist_checkpointing, tensor_parallel
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from pipeline import safeload

    class RestrictedCommonLoad(TorchCommonLoadStrategy):
        """common.pt through torch's weights_only loader, whatever torch.load's default is."""

        def load_common(self, checkpoint_dir):
            return safeload.safe_torch_load(Path(checkpoint_dir) / safeload.COMMON_FILE)

    try:  # megatron-core unpickles .metadata and the objects in the .distcp files in full: check them first
        common = safeload.check_torch_dist(path)
    except safeload.ConversionError as e:
        raise SystemExit(str(e)) from None
    if optimizer is not None:
        materialise_adam_state(optimizer)
        fix_torch_adam_reshard_load()
    same_layout = common.get("layout") == layout and optimizer is not None
    template = sharded_state(model, optimizer, scheduler, {}, same_layout, True)
    state = dist_checkpointing.load(template, str(path), common_strategy=RestrictedCommonLoad(),
                                    strict=StrictHandling.LOG_UNEXPECTED)
    for i, chunk in enumerate(model):
        chunk.module.load_state_dict(state["model" if len(model) == 1 else f"model{i}"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["opt_param_scheduler"])
    if same_layout:
        rng = state["rng_state"]
        random.setstate(rng["random"])
        torch.set_rng_state(rng["torch"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
        if torch.cuda.is_available() and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])
    return common


# ----------------------------------------------------------------------------- logging

class StepLog:
    """Rank 0: the step log file, the tracker (swanlab local by default) and a progress bar."""

    def __init__(self, job: Dict[str, Any], total_steps: int, start: int):
        self.out, self.t = Path(job["work_dir"]), job["train"]
        self.active = dist.get_rank() == 0
        self.tracker = None
        self.bar = None
        if not self.active:
            return
        name = self.t["tracker"]
        if name == "swanlab":
            import swanlab

            self.tracker = swanlab.init(project=job["name"], name=job["name"], mode=self.t["tracker_mode"],
                                        log_dir=str(self.out / "swanlog"), config={"model": job["model"], "train": self.t})
        elif name == "wandb":
            import wandb

            self.tracker = wandb.init(project=job["name"], name=job["name"], config={"model": job["model"], "train": self.t})
        elif name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tracker = SummaryWriter(str(self.out / "tensorboard"))
        if sys.stderr.isatty() or os.environ.get("PIPELINE_TTY"):
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, row: Dict[str, float]) -> None:
        if not self.active:
            return
        with open(self.out / LOG, "a") as f:
            f.write(json.dumps({"step": step, **row}) + "\n")
        if self.tracker is not None and hasattr(self.tracker, "add_scalar"):
            for k, v in row.items():
                self.tracker.add_scalar(k, v, step)
        elif self.tracker is not None:
            self.tracker.log(row, step=step)
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("loss", "eval_loss")})
        else:
            print(json.dumps({"step": step, **{k: round(v, 6) for k, v in row.items()}}), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tracker is not None:
            (getattr(self.tracker, "finish", None) or self.tracker.close)()


# ----------------------------------------------------------------------------- main

def main(job_path: str) -> None:
    rank_dies_with_launch()  # ends with its launcher and with the driver (pipeline/lifetime.py)
    job = json.loads(Path(job_path).read_text())
    t, par, out = job["train"], job["train"]["parallel"], Path(job["work_dir"])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:  # CPU (gloo) only: GPU runs never go through the compatibility layer
        from pipeline.train import megatron_cpu

        megatron_cpu.install()
    dist.init_process_group("nccl" if cuda else "gloo")
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    ps.initialize_model_parallel(par["tp"], par["pp"], par["vpp"])
    tensor_parallel.model_parallel_cuda_manual_seed(t["seed"])
    precision = t["precision"] if t["precision"] != "auto" else ("bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32")
    config = transformer_config(job, precision)
    model = build_model(job, config)

    total_steps, warmup = job["total_steps"], job["warmup_steps"]
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=t["lr"], min_lr=t["lr"] * t["min_lr_ratio"], weight_decay=t["weight_decay"],
        adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=t["grad_clip"], bf16=precision == "bf16",
        fp16=precision == "fp16", params_dtype=config.params_dtype,
        use_distributed_optimizer=par["distributed_optimizer"]), model)
    # cosine from lr to lr x min_lr_ratio after a linear warmup; steps here are optimizer steps
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t["lr"], min_lr=t["lr"] * t["min_lr_ratio"], lr_warmup_steps=warmup,
        lr_decay_steps=total_steps, lr_decay_style="cosine", start_wd=t["weight_decay"], end_wd=t["weight_decay"],
        wd_incr_steps=total_steps, wd_incr_style="constant")
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = [c.no_sync for c in model] if len(model) > 1 else model[0].no_sync

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    layout = {"tp": par["tp"], "pp": par["pp"], "vpp": par["vpp"], "dp": dp}
    identity = {"data_fingerprint": job["data_fingerprint"], "model_fingerprint": job["model_fingerprint"]}
    ckpt_root = out / "checkpoints"
    iteration, resumed_from, resumed_step = 0, None, None
    latest = latest_iteration(ckpt_root)
    if dist.get_rank() == 0 and ckpt_root.exists():  # checkpoints a kill left half-written are never read
        for p in ckpt_root.glob("iter_*"):
            if latest is None or int(p.name[5:]) > latest:
                shutil.rmtree(p, ignore_errors=True)
    chosen = Path(t["resume_from"]) if t.get("resume_from") else None  # train.resume_from
    if chosen is not None and latest_iteration(chosen) is not None:  # a checkpoints dir: its newest iteration
        chosen = iteration_dir(chosen, latest_iteration(chosen))
    if chosen is not None or latest is not None:
        path = chosen or iteration_dir(ckpt_root, latest)
        common = load_checkpoint(path, model, optimizer, scheduler, layout)
        from pipeline.train.hf_entry import check_identity

        check_identity(common, identity, path)
        if common["args"]["padded_vocab_size"] != job["padded_vocab_size"]:
            raise SystemExit(f"{path} has a {common['args']['padded_vocab_size']}-row embedding, this layout pads to "
                             f"{job['padded_vocab_size']}: pick train.make_vocab_size_divisible_by so that both TP "
                             f"sizes pad alike")
        iteration, resumed_from = common["iteration"], path.name
        resumed_step = iteration
        if dist.get_rank() == 0:
            print(f"resuming from {path.name}, step {iteration} of {total_steps}", flush=True)
    elif job["init"]:  # continued pretraining from a Megatron checkpoint: weights only
        init = Path(job["init"])
        load_checkpoint(iteration_dir(init, latest_iteration(init)), model, None, None, layout)

    global_batch = job["global_batch_sequences"]
    micro = t["micro_batch_size"]
    num_micro = global_batch // (micro * dp)
    valid_steps = job["valid_steps"]  # 0: the valid split holds less than one global batch, no evaluation
    train_ds, valid_ds = build_datasets(job, total_steps * global_batch, valid_steps * global_batch)
    train_batches = MicroBatches(train_ds, global_batch, micro, dp_rank, dp)
    valid_batches = MicroBatches(valid_ds, global_batch, micro, dp_rank, dp)
    tokens_per_step = global_batch * t["seq_len"]
    steplog = StepLog(job, total_steps, iteration)

    def evaluate() -> Optional[float]:
        if not valid_steps:
            return None
        for c in model:
            c.eval()
        total = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for step in range(valid_steps):
                total += run_batches(model, [valid_batches.batch(step) for _ in model], num_micro, job, True)
        for c in model:
            c.train()
        return float(total[0] / total[1])

    eval_every, save_every = job["eval_every_steps"], job["save_every_steps"]
    first_loss, eval_loss = None, None
    for c in model:
        c.train()
    while iteration < total_steps:
        started = time.time()
        for c in model:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        # each chunk walks the same micro batches: the schedule feeds the first (and, for labels, the last)
        total = run_batches(model, [train_batches.batch(iteration) for _ in model], num_micro, job, False)
        updated, grad_norm, _ = optimizer.step()
        if updated:  # an fp16 overflow skips the step, and the schedule waits with it (as Megatron-LM does)
            scheduler.step(increment=1)
        iteration += 1
        loss = float(total[0] / total[1])
        first_loss = loss if first_loss is None else first_loss
        row = {"loss": loss, "learning_rate": optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm or 0.0),
               "tokens_seen": iteration * tokens_per_step,
               "tokens_per_second": round(tokens_per_step / max(time.time() - started, 1e-9), 1)}
        if (iteration % eval_every == 0 or iteration == total_steps) and valid_steps:
            eval_loss = row["eval_loss"] = evaluate()
        if iteration % t["logging_steps"] == 0 or "eval_loss" in row:
            steplog.log(iteration, row)
        if iteration % save_every == 0 or iteration == total_steps:
            progress = {"iteration": iteration, "layout": layout, "args": job["checkpoint_args"], **identity}
            save_checkpoint(ckpt_root, model, optimizer, scheduler, progress, t["keep_checkpoints"])
    if eval_loss is None:
        eval_loss = evaluate()
    steplog.close()
    if dist.get_rank() == 0:
        # first_loss: of the first step this process trained (after a resume, the step after the checkpoint)
        summary = {"first_loss": first_loss, "eval_loss": eval_loss, "steps": iteration,
                   "tokens_seen": iteration * tokens_per_step, "resumed_from": resumed_from,
                   "resumed_step": resumed_step, "precision": precision,
                   "layout": layout, "checkpoint": f"checkpoints/{iteration_dir(ckpt_root, iteration).name}"}
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    dist.barrier()
    dist.destroy_process_group()  # without it gloo's threads abort the process at exit


if __name__ == "__main__":  # dist_checkpointing's async writer spawns processes: this guard is required
    from torch.distributed.elastic.multiprocessing.errors import record

    record(main)(sys.argv[-1])  # a failure reaches torchrun's summary with its traceback
