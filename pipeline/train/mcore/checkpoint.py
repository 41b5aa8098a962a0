"""The megatron backend's checkpoints, in Megatron-LM's layout (pipeline/formats/checkpoints.py):

    checkpoints/iter_0000040/                  torch_dist: model, optimizer, scheduler, RNG, progress
    checkpoints/latest_checkpointed_iteration.txt   written by rank 0 after every rank has saved

A checkpoint counts only once the tracker file names it, so a kill during a save leaves a directory
that resume ignores (and removes). torch_dist stores global tensors, so a checkpoint saved at one
TP/PP/DP layout resumes at another. What megatron-core would unpickle is checked first (safeload).
"""
from __future__ import annotations

import functools
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from pipeline import safeload
from pipeline.formats import megatron_args
from pipeline.formats.checkpoints import TRACKER, iteration_dir, latest_iteration, legacy_rank_files, tracked_dir
from pipeline.train.checkpoints import check_identity, remove_half_written, stale
from pipeline.train.job import TrainJob


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
        rng = {"random": random.getstate(), "torch": torch.get_rng_state(),
               "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        pp, tp = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
        state["rng_state"] = ShardedObject("rng_state", rng, (pp, tp), (ps.get_pipeline_model_parallel_rank(),
                                                                         ps.get_tensor_model_parallel_rank()),
                                           replica_id=ps.get_data_parallel_rank(with_context_parallel=True))
    return state


@functools.lru_cache(maxsize=None)  # the stage asks for it twice before launch
def read_checkpoint_args(ckpt_root: Path) -> Dict[str, Any]:
    """The `args` a checkpoint of this backend stores (model, vocab sizes), from its newest iteration, as
    our dict (stored in Megatron-LM's Namespace since it has been, a plain dict before)."""
    tracked = tracked_dir(ckpt_root)
    if tracked is None:
        raise FileNotFoundError(f"no {TRACKER} in {ckpt_root}")
    path = tracked / safeload.COMMON_FILE
    legacy = legacy_rank_files(ckpt_root)
    if not path.is_file() and legacy:  # every rank file holds the args: the first one's, its tensors mmapped
        path = legacy[0]
        return megatron_args.our_args(safeload.safe_torch_load(path, mmap=True)["args"], str(path))
    return megatron_args.our_args(safeload.safe_torch_load(path)["args"], str(path))


def megatron_lm_args(model, args: Dict[str, Any], iteration: int):
    """Megatron-LM's args for this run's checkpoints (its loaders and --use-checkpoint-args read them)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import gpt_layer_specs

    vpp = len(model) if len(model) > 1 else None
    dtype = next(model[0].parameters()).dtype
    # the layer spec model.layer_spec picks
    impl = "transformer_engine" if torch.cuda.is_available() and gpt_layer_specs.HAVE_TE else "local"
    return megatron_args.namespace(args, ps.get_tensor_model_parallel_world_size(),
                                   ps.get_pipeline_model_parallel_world_size(), vpp, impl, dtype, iteration,
                                   "torch_dist")


def save_checkpoint(ckpt_root: Path, model, optimizer, scheduler, progress: Dict[str, Any], keep: int) -> None:
    from megatron.core import dist_checkpointing

    iteration = progress["iteration"]
    path = iteration_dir(ckpt_root, iteration)
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    dist.barrier()
    progress = {**progress, "checkpoint_version": megatron_args.CHECKPOINT_VERSION}
    if isinstance(progress.get("args"), dict):
        progress["args"] = megatron_lm_args(model, progress["args"], iteration)
    dist_checkpointing.save(sharded_state(model, optimizer, scheduler, progress, True, False), str(path))
    dist.barrier()  # every rank has written its shards
    if dist.get_rank() == 0:
        tmp = ckpt_root / (TRACKER + ".tmp")
        tmp.write_text(str(iteration))
        os.replace(tmp, ckpt_root / TRACKER)
        done = sorted(int(p.name[5:]) for p in ckpt_root.glob("iter_*"))
        for old in stale(done, keep):
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
    from megatron.core import dist_checkpointing, tensor_parallel
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy
    from megatron.core.dist_checkpointing.validation import StrictHandling

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


def resume(job: TrainJob, ckpt_root: Path, model, optimizer, scheduler,
           layout: Dict[str, int]) -> Tuple[int, Optional[str]]:
    """Where this run starts: train.resume_from, else the newest complete checkpoint in ckpt_root (the
    half-written ones past it removed), else step 0 from the init checkpoint's weights or from scratch.
    Returns (iteration, the checkpoint dir's name or None)."""
    latest = latest_iteration(ckpt_root)
    if dist.get_rank() == 0:  # checkpoints a kill left half-written are never read
        remove_half_written(ckpt_root, "megatron")
    chosen = Path(job.train.resume_from) if job.train.resume_from else None  # train.resume_from
    if chosen is not None and latest_iteration(chosen) is not None:  # a checkpoints dir: its newest iteration
        chosen = iteration_dir(chosen, latest_iteration(chosen))
    if chosen is not None or latest is not None:
        path = chosen or iteration_dir(ckpt_root, latest)
        common = load_checkpoint(path, model, optimizer, scheduler, layout)
        check_identity(common, job.identity, path)
        stored = megatron_args.our_args(common["args"], str(path))
        if stored["padded_vocab_size"] != job.padded_vocab_size:
            raise SystemExit(f"{path} has a {stored['padded_vocab_size']}-row embedding, this layout pads to "
                             f"{job.padded_vocab_size}: pick train.make_vocab_size_divisible_by so that both TP "
                             f"sizes pad alike")
        if dist.get_rank() == 0:
            print(f"resuming from {path.name}, step {common['iteration']} of {job.total_steps}", flush=True)
        return common["iteration"], path.name
    if job.init:  # continued pretraining from a Megatron checkpoint: weights only
        init = Path(job.init)
        load_checkpoint(tracked_dir(init), model, None, None, layout)
    return 0, None
