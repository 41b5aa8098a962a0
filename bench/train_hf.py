"""Step time of the pipeline's HF training against a bare PyTorch loop, in the same run.

    python bench/train_hf.py [--steps 60] [--rounds 3] [--smoke] [model/train overrides ...]

Both sides: the tiny_cpu model (same init, from the pipeline's own build_model), the same mixed data
through BlockDataset, the same batches (seeded sampler, 4 x 128 tokens micro batch, 4 accumulation
steps = 2,048 tokens per step on one process), AdamW with the same lr / weight decay, grad clip 1.0
and the cosine schedule. Pipeline = transformers.Trainer with the TrainingArguments the train stage
builds (training_arguments in pipeline/train/hf_backend.py), once plain and once with DeepSpeed ZeRO-2
(one rank). Evaluation and checkpointing are off on both sides: this measures the step loop. The
first 5 steps are warm-up and not timed; the median step time is compared.
Target: pipeline / bare <= 1.05. --smoke: 7 steps, one round (make test runs it, to keep it working).
"""
from __future__ import annotations

import os
import sys

# bench/tokenize.py would shadow the standard library's `tokenize` for everything imported after
# this line, because Python puts this script's folder first on sys.path: drop that entry.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bench.measure, by the package path (this script's own folder is off sys.path)
from bench.measure import RESULT, parse_args, ratio, result_fields, run_checked  # noqa: E402

WARMUP = 5


def data_run(out: Path) -> Path:
    run_dir = out / "train_bench_run"
    run_checked([sys.executable, "-m", "pipeline.cli", "run", f"run_dir={run_dir}", "--only",
                 "tokenizer,tokenize,mix"], "the data stages")
    return run_dir


def make_job(run_dir: Path, steps: int, zero: bool, overrides: list) -> dict:
    from omegaconf import OmegaConf

    from pipeline.config import compose, grad_accumulation
    from pipeline.data.tokenizer import tokenizer_info
    from pipeline.train.stage import deepspeed_config

    cfg = compose([f"run_dir={run_dir}", "launcher.nproc_per_node=1", f"train.max_steps={steps}",
                   "train.eval_every=1000000000", "train.save_every=1000000000", "train.tracker=none", *overrides])
    info = tokenizer_info(run_dir / "tokenizer")
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return {"name": "bench", "work_dir": str(run_dir / "bench_train"), "model": plain["model"],
            "train": plain["train"], "init": None, "vocab_size": info["vocab_len"], "eod_id": info["eod_id"],
            "grad_accumulation": grad_accumulation(cfg), "global_batch_tokens": cfg.train.global_batch_tokens,
            "deepspeed": deepspeed_config(cfg.train) if zero else None}


def pipeline_step_times(job: dict, dataset) -> tuple:
    """(step times, forward+backward time within each step) of the Trainer the train stage builds."""
    from transformers import Trainer, TrainerCallback

    from pipeline.train.hf_backend import build_model, training_arguments

    times, fwd_bwd, current = [], [], [0.0]

    class TimedTrainer(Trainer):
        def training_step(self, *a, **kw):
            t0 = time.perf_counter()
            loss = super().training_step(*a, **kw)
            current[0] += time.perf_counter() - t0
            return loss

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0, current[0] = time.perf_counter(), 0.0

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)
            fwd_bwd.append(current[0])

    args = training_arguments(job, "fp32", False, report_to=[])
    args.load_best_model_at_end = False  # no evaluation in a step-time benchmark
    args.eval_strategy = "no"
    args.save_strategy = "no"
    args.disable_tqdm = True
    TimedTrainer(model=build_model(job), args=args, train_dataset=dataset, callbacks=[Clock()]).train()
    return times[WARMUP:], fwd_bwd[WARMUP:]


def bare_step_times(job: dict, dataset) -> tuple:
    """The same work written by hand: no Trainer, no callbacks, no accelerate."""
    from pipeline.train.hf_backend import build_model

    t = job["train"]
    model = build_model(job)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=t["lr"])
    steps, warm = t["max_steps"], math.ceil(t["warmup_ratio"] * t["max_steps"])

    def lr_at(step):
        if step < warm:
            return step / max(1, warm)
        progress = (step - warm) / max(1, steps - warm)
        return t["min_lr_ratio"] + (1 - t["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(t["seed"]))
    loader = iter(torch.utils.data.DataLoader(dataset, batch_size=t["micro_batch_size"], sampler=sampler))
    accumulation, times, fwd_bwd = job["grad_accumulation"], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        inner = 0.0
        for _ in range(accumulation):
            batch = next(loader)
            t1 = time.perf_counter()
            (model(**batch).loss / accumulation).backward()
            inner += time.perf_counter() - t1
        fwd_bwd.append(inner)
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times[WARMUP:], fwd_bwd[WARMUP:]


VARIANTS = {"bare": "bare PyTorch loop", "trainer": "pipeline: HF Trainer (train stage's args)",
            "zero2": "pipeline: HF Trainer + DeepSpeed ZeRO-2"}


def one_variant(variant: str, steps: int, overrides: list, out: Path) -> None:
    """Runs in its own process: a second training in one process runs slower than the first
    (allocator and thread-pool state), which would bias whichever side goes second."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"})  # DeepSpeed wants a process group even for one rank
    from pipeline.train.blocks import BlockDataset

    run_dir = out / "train_bench_run"
    job = make_job(run_dir, steps, variant == "zero2", overrides)
    dataset = BlockDataset(run_dir / "mix" / "train", job["train"]["seq_len"])
    times, fwd_bwd = bare_step_times(job, dataset) if variant == "bare" else pipeline_step_times(job, dataset)
    other = [t - f for t, f in zip(times, fwd_bwd)]
    m = job["model"]
    print(f"{RESULT}{statistics.median(times)} {statistics.median(other)} {m['num_layers']} {m['hidden_size']} "
          f"{job['grad_accumulation']} {job['global_batch_tokens']} {job['train']['micro_batch_size']} "
          f"{job['train']['seq_len']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(REPO / "bench" / "out"))
    ap.add_argument("overrides", nargs="*",
                    help="Hydra overrides for the model/train config, e.g. model.hidden_size=512")
    args = parse_args(ap, {"steps": 7, "rounds": 1})
    if args.variant:
        return one_variant(args.variant, args.steps, args.overrides, Path(args.out))
    data_run(Path(args.out))
    medians = {v: [] for v in VARIANTS}
    others = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):  # interleaved, each in a fresh process, so noise hits every side alike
        for variant in VARIANTS:
            fields = result_fields([sys.executable, __file__, "--variant", variant, "--steps", str(args.steps),
                                    "--out", args.out, *args.overrides], variant)
            medians[variant].append(float(fields[0]))
            others[variant].append(float(fields[1]))
    layers, hidden, accumulation, tokens, micro, seq = fields[2:]
    best = {k: min(v) for k, v in medians.items()}
    print(f"model {layers} layers x {hidden} ({' '.join(args.overrides) or 'tiny_cpu'}), 1 process, "
          f"{micro} x {seq} tokens x {accumulation} accumulation = {int(tokens):,} tokens/step; median of "
          f"{args.steps - WARMUP} steps per run, best of {args.rounds} interleaved runs (each in a fresh process)\n")
    print(f"{'run':<44} {'ms/step':>8} {'vs bare':>8} {'outside fwd+bwd':>16}   all runs (ms)")
    other = {k: statistics.median(v) for k, v in others.items()}
    for key, label in VARIANTS.items():
        runs = " ".join(f"{m * 1000:.0f}" for m in medians[key])
        print(f"{label:<44} {best[key] * 1000:>8.1f} {best[key] / best['bare']:>7.3f}x {other[key] * 1000:>13.1f} ms"
              f"   {runs}" + ("   target <= 1.05x" if key != "bare" else ""))
    # Forward+backward is the same work on every side; what the pipeline adds is the rest of the step
    # (optimizer, clipping, schedule, data, callbacks), measured inside each process and so free of the
    # run-to-run speed swings of this shared machine.
    for key in ("trainer", "zero2"):
        added = other[key] - other["bare"]
        print(f"{VARIANTS[key]}: adds {added * 1000:+.1f} ms/step outside forward+backward = "
              f"{added / best['bare'] * 100:+.1f}% of a bare step")
    print()
    for key in ("trainer", "zero2"):
        ratio(f"{VARIANTS[key]} step time", best[key] / best["bare"], "the bare loop's (target <= 1.05x)")


if __name__ == "__main__":
    main()
