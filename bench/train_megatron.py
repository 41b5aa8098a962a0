"""Step time of the pipeline's megatron backend at TP=1 against a bare PyTorch loop, in the same run.

    python bench/train_megatron.py [--steps 60] [--rounds 3] [--smoke] [model/train overrides ...]

Pipeline = the real train stage (`pipeline run --only train`, experiment tiny_cpu_megatron at TP=1,
PP=1, one process): megatron-core's DDP, distributed optimizer, pipeline schedule, GPTDataset
micro batches, logging. Its step times come from the stage's own step log (each step's wall time,
start to end). Bare = the same megatron-core GPTModel built from the same job.json (same init seed), fed
the same micro batches from the same GPTDataset, trained by a hand-written loop: forward, mean
loss, backward, clip_grad_norm_, torch AdamW with the same betas/eps/weight decay and the same
warmup + cosine schedule. Evaluation and checkpointing are outside the timed steps on both sides.
Each side runs in a fresh process; rounds are interleaved so machine noise hits both alike; the
first 5 steps are warm-up. --smoke: 7 steps, one round (make test runs it, to keep it working). The
data stages and the import stage (nothing to import here) run first: the train stage needs all three
published. On a GPU the pipeline's MFU is reported too (bf16 dense peak of the
device, from PEAK_TFLOPS; not gated), e.g. for a ~1B Llama:
    python bench/train_megatron.py model.hidden_size=2048 model.num_layers=16 model.num_attention_heads=16 \\
        model.num_key_value_heads=8 model.ffn_hidden_size=5632 train.seq_len=2048 train.micro_batch_size=4 \\
        train.global_batch_tokens=65536 model.max_position_embeddings=2048
"""
from __future__ import annotations

import os
import sys

# bench/tokenize.py would shadow the standard library's `tokenize` for everything imported after
# this line, because Python puts this script's folder first on sys.path: drop that entry.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse
import json
import math
import shutil
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bench.measure, by the package path (this script's own folder is off sys.path)
from bench.measure import RESULT, parse_args, ratio, result_fields, run_checked  # noqa: E402

WARMUP = 5
DATA_STAGES = "tokenizer,tokenize,mix,import"  # what the train stage needs published (pipeline/stages.py)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # bf16 dense, per GPU


def pipeline_args(run_dir: Path, steps: int, overrides: list) -> list:
    return [sys.executable, "-m", "pipeline.cli", "run", "experiment=tiny_cpu_megatron", f"run_dir={run_dir}",
            "launcher.nproc_per_node=1", "train.parallel.tp=1", "train.parallel.pp=1", f"train.max_steps={steps}",
            "train.eval_every=1000000000", "train.save_every=1000000000", "train.tracker=none", *overrides]


def pipeline_step_times(run_dir: Path, steps: int, overrides: list) -> list:
    """Runs the train stage; its step log has tokens/s of every step (wall time since the previous one)."""
    shutil.rmtree(run_dir / "train", ignore_errors=True)
    run_checked(pipeline_args(run_dir, steps, overrides) + ["--only", "train"], "pipeline run --only train")
    job = json.loads((run_dir / "train" / "job.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "train" / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tokens_per_second" in r]  # evaluation rows carry no step time
    return [job["global_batch_tokens"] / r["tokens_per_second"] for r in steps][WARMUP:]


def bare_step_times(job_path: Path) -> list:
    """The same model and micro batches, trained by a loop written by hand (one process, no DDP)."""
    import torch
    import torch.distributed as dist

    from pipeline.train.mcore import data
    from pipeline.train.mcore import model as models

    job = json.loads(job_path.read_text())
    t = job["train"]
    cuda = torch.cuda.is_available()
    if not cuda:
        from pipeline.train.mcore import cpu as megatron_cpu

        megatron_cpu.install()
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29534", "RANK": "0", "WORLD_SIZE": "1"})
    dist.init_process_group("nccl" if cuda else "gloo")
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    ps.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(t["seed"])
    precision = "bf16" if cuda else "fp32"
    model = models.build_model(job, models.transformer_config(job, precision))[0].module  # no DDP wrapper
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=t["lr"], betas=(0.9, 0.95), eps=1e-8)
    steps, warm = job["total_steps"], job["warmup_steps"]

    def lr_at(step):
        if step < warm:
            return (step + 1) / max(1, warm)
        progress = (step - warm) / max(1, steps - warm)
        return t["min_lr_ratio"] + (1 - t["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    global_batch, micro = job["global_batch_sequences"], t["micro_batch_size"]
    train_ds, _ = data.build_datasets(job, steps * global_batch, 0)
    batches = data.MicroBatches(train_ds, global_batch, micro, 0, 1)
    device = "cuda" if cuda else "cpu"
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        micro_batches = list(batches.batch(step))
        for b in micro_batches:
            b = {k: v.to(device) for k, v in b.items()}
            losses = model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"])
            (losses.float().mean() / len(micro_batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    dist.destroy_process_group()
    return times[WARMUP:]


def model_flops_per_token(job: dict) -> float:
    """6 x parameters in the matmuls + the attention scores (12 x layers x hidden x seq), per token trained."""
    m, seq = job["model"], job["train"]["seq_len"]
    h, layers, kv = m["hidden_size"], m["num_layers"], m["num_key_value_heads"] or m["num_attention_heads"]
    head_dim = h // m["num_attention_heads"]
    attn = h * (h + 2 * kv * head_dim) + h * h
    mlp = 3 * h * (m["ffn_hidden_size"] or 4 * h)
    params = layers * (attn + mlp) + 2 * job["padded_vocab_size"] * h
    return 6 * params + 12 * layers * h * seq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bare-job", help=argparse.SUPPRESS)  # internal: run the bare side for this job.json
    ap.add_argument("--out", default=str(REPO / "bench" / "out"))
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.hidden_size=512")
    args = parse_args(ap, {"steps": 7, "rounds": 1})
    if args.bare_job:
        print(f"{RESULT}{statistics.median(bare_step_times(Path(args.bare_job)))}")
        return
    run_dir = Path(args.out) / "train_megatron_bench_run"
    run_checked(pipeline_args(run_dir, args.steps, args.overrides) + ["--only", DATA_STAGES], DATA_STAGES)
    medians = {"bare": [], "pipeline": []}
    for _ in range(args.rounds):  # interleaved, each side in a fresh process
        medians["pipeline"].append(statistics.median(pipeline_step_times(run_dir, args.steps, args.overrides)))
        fields = result_fields([sys.executable, __file__, "--bare-job", str(run_dir / "train" / "job.json")],
                               "bare loop")
        medians["bare"].append(float(fields[0]))
    job = json.loads((run_dir / "train" / "job.json").read_text())
    m, t = job["model"], job["train"]
    best = {k: min(v) for k, v in medians.items()}
    print(f"model {m['num_layers']} layers x {m['hidden_size']} ({' '.join(args.overrides) or 'tiny_cpu'}), "
          f"TP=1 PP=1, 1 process, {t['micro_batch_size']} x {t['seq_len']} tokens x {job['grad_accumulation']} "
          f"micro batches = {job['global_batch_tokens']:,} tokens/step; median of {args.steps - WARMUP} steps "
          f"per run, best of {args.rounds} interleaved runs (each in a fresh process)\n")
    print(f"{'run':<46} {'ms/step':>8} {'vs bare':>8}   all runs (ms)")
    labels = {"bare": "bare PyTorch loop, same GPTModel and batches",
              "pipeline": "pipeline: megatron backend (train stage)"}
    for key, label in labels.items():
        runs = " ".join(f"{x * 1000:.0f}" for x in medians[key])
        print(f"{label:<46} {best[key] * 1000:>8.1f} {best[key] / best['bare']:>7.3f}x   {runs}")
    print()
    ratio("megatron backend step time", best["pipeline"] / best["bare"], "the bare loop's")
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        achieved = model_flops_per_token(job) * job["global_batch_tokens"] / best["pipeline"] / 1e12
        mfu = f"{achieved / peak:.1%} of {peak:.0f} TFLOP/s" if peak else "peak unknown for this device"
        print(f"\n{name}: pipeline {job['global_batch_tokens'] / best['pipeline']:,.0f} tokens/s, "
              f"{achieved:.1f} model TFLOP/s, MFU {mfu}")


if __name__ == "__main__":
    main()
