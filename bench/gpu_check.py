"""The GPU check: bf16 training of a ~1B Llama on each backend from one init, then the conversion
back to HF, verified. Run through bench/gpu_check.sh (which installs first); it prints one table.

    python bench/gpu_check.py [--steps 30] [--out runs/gpu_check] [--smoke]

1. The data stages of the default experiment (the shipped sample, a 4096-entry BPE).
2. One random init, a Llama-3.2-1B-shaped model (hidden 2048, 16 layers, ffn 8192, 32 heads, 8 KV
   heads; our 4096-entry vocabulary), written as an HF dir with the tokenizer.
3. `train.init=<it>` on the hf backend (Trainer, ZeRO-0, 1 GPU) and on the megatron backend (TP=1;
   the Transformer Engine spec when TE imports, which the table says). The megatron run's import stage
   converts the init and verifies it by logits; its export stage converts the result back to HF and
   verifies it.
4. Per backend: mean tokens/s, TFLOP/s per GPU and MFU over every step but the first
   (train_summary.json, pipeline/train/throughput.py), and the first step's loss.
5. Parity: both backends' first-step losses, from the same init, agree within 3x the spread of the
   init's loss across batches (measured here on 4 batches of the train split through the HF model,
   at least 0.02): their samplers draw different first batches, so the spread is the honest bound.

`--smoke`: a 2-layer model, 3 steps, on the CPU in fp32 (what make test runs, to keep the script
working); it checks the same things at that size.
"""
from __future__ import annotations

import os
import sys

# bench/tokenize.py would shadow the standard library's `tokenize`: drop this script's folder from sys.path
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse
import json
import math
import shutil
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL_1B = dict(hidden_size=2048, num_layers=16, ffn_hidden_size=8192, num_attention_heads=32,
                num_key_value_heads=8, max_position_embeddings=2048)
MODEL_SMOKE = dict(hidden_size=64, num_layers=2, ffn_hidden_size=176, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=256)


def pipeline(*args: str) -> None:
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"gpu_check: `pipeline {' '.join(args)}` failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    print(f"  pipeline {args[0]} {' '.join(a for a in args if a.startswith(('train.backend', '--only')))}: "
          f"{time.time() - started:.0f} s", flush=True)


def write_init(run: Path, model: dict, seed: int = 1234) -> Path:
    """A random HF Llama from the model table, with the run's tokenizer beside it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    init = run.parent / f"{run.name}_init"
    if (init / "config.json").is_file():
        return init
    tok = AutoTokenizer.from_pretrained(run / "tokenizer")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=model["hidden_size"], num_hidden_layers=model["num_layers"],
                         intermediate_size=model["ffn_hidden_size"], num_attention_heads=model["num_attention_heads"],
                         num_key_value_heads=model["num_key_value_heads"],
                         max_position_embeddings=model["max_position_embeddings"], tie_word_embeddings=False,
                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(init)
    tok.save_pretrained(init)
    return init


def init_loss_spread(init: Path, train_prefix: Path, seq_len: int, batches: int = 4, rows: int = 4) -> float:
    """Standard deviation of the init's mean loss over `batches` disjoint batches of the train split."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.formats.indexed import IndexedReader

    tokens = IndexedReader(train_prefix).tokens
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.bfloat16 if cuda else torch.float32)
    model = model.to("cuda" if cuda else "cpu").eval()
    losses = []
    with torch.no_grad():
        for b in range(batches):
            start = b * rows * seq_len
            ids = torch.as_tensor(tokens[start:start + rows * seq_len].astype("int64")).view(rows, seq_len)
            losses.append(float(model(input_ids=ids.to(model.device), labels=ids.to(model.device)).loss))
    mean = sum(losses) / len(losses)
    return math.sqrt(sum((x - mean) ** 2 for x in losses) / len(losses))


def first_loss(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "train" / "train_log.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in rows if "loss" in r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check")
    ap.add_argument("--smoke", action="store_true", help="a 2-layer model, 3 steps, CPU fp32 (make test)")
    args = ap.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        sys.exit("gpu_check: no CUDA device here; run it on a GPU machine (or --smoke to exercise it on a CPU)")
    model = MODEL_SMOKE if args.smoke else MODEL_1B
    steps = 3 if args.smoke else args.steps
    seq_len, micro = (128, 2) if args.smoke else (2048, 8)
    try:
        import transformer_engine  # noqa: F401

        te = True
    except Exception:  # ImportError, or a TE build that does not match this torch
        te = False
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"gpu_check: {device}, torch {torch.__version__}, Transformer Engine {'yes' if te else 'no'}, "
          f"{steps} steps of {micro} x {seq_len} tokens", flush=True)
    base = [*(f"model.{k}={v}" for k, v in model.items()), f"train.seq_len={seq_len}",
            f"train.micro_batch_size={micro}", f"train.global_batch_tokens={micro * seq_len}",
            f"train.max_steps={steps}", f"train.eval_every={steps}", f"train.save_every={steps}",
            "train.tracker=none", "launcher.nproc_per_node=1", "train.precision=" + ("bf16" if cuda else "fp32")]
    if args.smoke:
        base += ["tokenizer.vocab_size=1024", "tokenizer.sample_docs_per_source=100"]
    runs = {"hf": args.out / "hf", "megatron": args.out / "megatron"}
    data = args.out / "data"
    pipeline("run", f"run_dir={data}", *base, "--only", "tokenizer,tokenize,mix")
    init = write_init(data, model)
    spread = init_loss_spread(init, data / "mix" / "train", seq_len)
    for backend, run in runs.items():
        if not (run / "mix").exists():  # the same data stages: copied, so each run skips them
            shutil.copytree(data, run)
        extra = (["train.zero_stage=0"] if backend == "hf" else
                 ["experiment=tiny_cpu_megatron", "train.parallel.tp=1", "export.tolerance=0.05" if cuda else
                  "export.tolerance=1e-4"])
        pipeline("run", f"run_dir={run}", *extra, *base, f"train.backend={backend}", f"train.init={init}")
    print("\n| backend | tokens/s | TFLOP/s per GPU | MFU | first loss |\n|---|---:|---:|---:|---:|")
    summaries = {b: json.loads((run / "train" / "train_summary.json").read_text()) for b, run in runs.items()}
    losses = {b: first_loss(run) for b, run in runs.items()}
    for backend, s in summaries.items():
        mfu = f"{s['mfu']:.1%}" if s.get("mfu") is not None else "n/a (no peak)"
        print(f"| {backend} | {s['tokens_per_second']:,.0f} | {s['tflops_per_device']:.1f} | {mfu} | "
              f"{losses[backend]:.4f} |")
    bound = max(3 * spread, 0.02)
    gap = abs(losses["hf"] - losses["megatron"])
    verdicts = {"first-step loss parity": gap <= bound}
    print(f"\nfirst-step losses differ by {gap:.4f} (bound {bound:.4f} = max(3 x {spread:.4f} batch spread, 0.02))")
    for stage in ("import", "export"):
        for report in sorted((runs["megatron"] / stage).glob("verify*.json")):
            r = json.loads(report.read_text())
            verdicts[f"{stage} {report.stem}"] = bool(r["passed"])
            print(f"{stage}/{report.name}: max |logit diff| {r['max_abs_diff']:.3g}, top-1 "
                  f"{r.get('top1_agreement', float('nan')):.3f}, {'passed' if r['passed'] else 'FAILED'}")
    rate = summaries["megatron"]["tokens_per_second"] / summaries["hf"]["tokens_per_second"]
    print(f"ratio: megatron tokens/s = {rate:.2f}x the hf backend's (same model, batch)")
    failed = [name for name, ok in verdicts.items() if not ok]
    print("gpu_check: " + ("all checks passed" if not failed else f"FAILED: {', '.join(failed)}"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
