"""Checkpoint conversion speed and memory on a ~1B-parameter Llama (bf16, random weights built here).

    python bench/convert.py [--layers 18] [--rounds 2]

Baselines, measured in the same run:
- `shutil.copytree` of the same HF checkpoint (the bytes every conversion must at least read and
  write; in-kernel copies on Linux);
- the floor of any torch-based converter: a fresh Python process that imports torch, then reads and
  writes the same bytes through user space (64 MiB at a time).
Each conversion is `pipeline convert` in a fresh process, timed from before its imports; its peak
RSS (VmHWM) and peak anonymous memory (sampled) are compared with the checkpoint size.
Targets: wall time <= 2x the copy, peak RSS <= 0.5x the checkpoint. The page cache is warm for all
runs alike (the source was just written), so the copy is a fair floor rather than a disk benchmark,
and dirty pages are flushed (os.sync, untimed) before every run so that none pays for another's
writeback.
"""
from __future__ import annotations

import os
import sys

# bench/tokenize.py would shadow the standard library's `tokenize`: drop this script's folder from sys.path
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Peak RSS counts the pages of memory-mapped files too (safetensors and torch_dist are read through
# mmap; the kernel can drop those pages any time), so the anonymous part, the memory the conversion
# itself holds, is sampled as well.
MEASURE = """
import time
t0 = time.perf_counter()
import sys, threading
from pipeline.cli import main

peak_anon = [0]

def sample():
    while True:
        with open("/proc/self/status") as f:
            anon = next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
        peak_anon[0] = max(peak_anon[0], anon * 1024)
        time.sleep(0.01)

threading.Thread(target=sample, daemon=True).start()
rc = main(sys.argv[1:])
wall = time.perf_counter() - t0
with open("/proc/self/status") as f:  # VmHWM, not getrusage: ru_maxrss carries the bench's own peak over exec
    peak_rss = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(f"RESULT {rc} {wall} {peak_rss * 1024} {peak_anon[0]}")
"""

FLOOR = """
import time
t0 = time.perf_counter()
import sys, torch
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
buffer = memoryview(bytearray(64 << 20))
for f in sorted(src.iterdir()):
    with open(f, "rb", buffering=0) as i, open(dst / f.name, "wb", buffering=0) as o:
        while n := i.readinto(buffer):
            o.write(buffer[:n])
print(f"RESULT 0 {time.perf_counter() - t0} 0 0")
"""


def build_model(out: Path, layers: int) -> int:
    """A Llama of ~1B parameters in bf16: hidden 2048, GQA 16/8 heads, ffn 5632, vocab 32000."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048,
                         dtype="bfloat16", architectures=["LlamaForCausalLM"])
    out.mkdir(parents=True)
    config.save_pretrained(out)
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    h, kv, ffn = 2048, 1024, 5632
    shards, params = [], 0
    for i in range(layers):  # one safetensors shard per 4 layers, with an index, as HF writes big models
        p = f"model.layers.{i}."
        shards.append({p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
                       p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
                       p + "mlp.gate_proj.weight": rand(ffn, h), p + "mlp.up_proj.weight": rand(ffn, h),
                       p + "mlp.down_proj.weight": rand(h, ffn),
                       p + "input_layernorm.weight": torch.ones(h).bfloat16(),
                       p + "post_attention_layernorm.weight": torch.ones(h).bfloat16()})
    shards.append({"model.embed_tokens.weight": rand(32000, h), "lm_head.weight": rand(32000, h),
                   "model.norm.weight": torch.ones(h).bfloat16()})
    groups = [{k: v for s in shards[i:i + 4] for k, v in s.items()} for i in range(0, len(shards), 4)]
    weight_map = {}
    for n, group in enumerate(groups, 1):
        name = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
        params += sum(t.numel() for t in group.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return params


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_measured(script: str, *args: str) -> tuple:
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=REPO)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None or line.split()[1] != "0":
        sys.exit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    _, _, wall, rss, anon = line.split()
    return float(wall), int(rss), int(anon)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "convert"))
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    hf = out / "hf"
    params = build_model(hf, args.layers)
    size = dir_bytes(hf)
    runs = {
        "copytree (baseline)": None,
        "python + torch read/write (floor)": "floor",
        "HF -> Megatron torch_dist": ("to=megatron", "src", hf, "mg_dist"),
        "HF -> Megatron legacy TP2 x PP2": ("to=megatron", "src", hf, "mg_legacy", "tp=2", "pp=2", "format=torch"),
        "Megatron torch_dist -> HF": ("to=hf", "src", "mg_dist", "hf_back"),
    }
    best = {name: (float("inf"), 0, 0) for name in runs}
    for _ in range(args.rounds):  # interleaved, each conversion in a fresh process
        for name, spec in runs.items():
            dst = out / ("copy" if spec in (None, "floor") else spec[3])
            shutil.rmtree(dst, ignore_errors=True)
            os.sync()  # flush dirty pages, untimed: no run pays for another's writeback
            if spec is None:
                t0 = time.perf_counter()
                shutil.copytree(hf, dst)
                wall, rss, anon = time.perf_counter() - t0, 0, 0
            elif spec == "floor":
                wall, _, _ = run_measured(FLOOR, str(hf), str(dst))
                rss = anon = 0
            else:
                to, _, src, _, *extra = spec
                src = src if isinstance(src, Path) else out / src
                wall, rss, anon = run_measured(MEASURE, "convert", f"src={src}", f"dst={dst}", to, *extra)
            best[name] = (min(best[name][0], wall), max(best[name][1], rss), max(best[name][2], anon))
    copy, floor = best["copytree (baseline)"][0], best["python + torch read/write (floor)"][0]
    print(f"Llama, {params / 1e9:.2f}B parameters, bf16, {size / 1e9:.2f} GB in {len(list(hf.glob('*.safetensors')))} "
          f"safetensors shards; best wall of {args.rounds} interleaved rounds, each conversion in a fresh process\n")
    print(f"{'run':<36} {'seconds':>8} {'vs copy':>8} {'vs floor':>8} {'peak RSS':>10} {'vs ckpt':>8} "
          f"{'peak anon':>10} {'vs ckpt':>8}")
    for name, (wall, rss, anon) in best.items():
        mem = (f"{rss / 1e9:>7.2f} GB {rss / size:>7.2f}x {anon / 1e9:>7.2f} GB {anon / size:>7.2f}x" if rss
               else f"{'-':>10} {'-':>8} {'-':>10} {'-':>8}")
        print(f"{name:<36} {wall:>8.1f} {wall / copy:>7.2f}x {wall / floor:>7.2f}x {mem}")
    print("\ntargets: wall <= 2x the copy, peak RSS <= 0.5x the checkpoint")


if __name__ == "__main__":
    main()
