"""Checkpoint conversion speed and memory on a ~1B-parameter Llama (bf16, random weights built here).

    python bench/convert.py [--shape 1B] [--layers 18] [--rounds 2] [--generated 1B,8B] [--smoke]

Baselines, measured in the same run:
- `shutil.copytree` of the same HF checkpoint (the bytes every conversion must at least read and
  write; in-kernel copies on Linux);
- the floor of any torch-based converter: a fresh Python process that imports torch, then reads and
  writes the same bytes through user space (64 MiB at a time).
Each conversion is `pipeline convert` in a fresh process, timed from before its imports; its peak
RSS (VmHWM) and peak anonymous memory (sampled) are compared with the checkpoint size.
Inputs written by Megatron-LM are converted too: torch_dist and legacy (`iter_0000001/mp_rank_00/
model_optim_rng.pt`), with Megatron-LM's argparse.Namespace as `args`, checkpoint_version 3.0 and the
model under megatron-core's names (as_megatron_lm). Then, to show that memory stays flat with size,
HF -> torch_dist from a source generated as it is read (GeneratedReader: no input on disk) at the 1B and
Llama-3-8B shapes, whose 16 GB output is deleted right after.
--smoke: a 2-layer, 256-wide model, one round, a generated source of that shape (make test runs it).
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bench.measure, by the package path (this script's own folder is off sys.path)
from bench.measure import parse_args, ratio, result_fields  # noqa: E402

# Peak RSS counts the pages of memory-mapped files too (safetensors and torch_dist are read through
# mmap; the kernel can drop those pages any time), so the anonymous part, the memory the conversion
# itself holds, is sampled as well.
MEASURE = """
import time
t0 = time.perf_counter()
import sys, threading
if sys.argv[1] == "--generated":  # the HF source is made as it is read (bench/convert.py GeneratedReader)
    del sys.argv[1]
    from bench.convert import generated_source
    generated_source()
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


# Llama shapes: the file-based runs build --shape, the generated ones --generated (layers: --layers overrides
# the file-based shape's)
SHAPES = {
    "1B": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=8,
               vocab_size=32000, num_hidden_layers=18),
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, num_hidden_layers=32),  # Llama-3-8B's
    "smoke": dict(hidden_size=256, intermediate_size=704, num_attention_heads=8, num_key_value_heads=4,
                  vocab_size=32000, num_hidden_layers=2),
}


def llama_config(shape: str, layers: int | None = None):
    from transformers import LlamaConfig

    sizes = {**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})}
    return LlamaConfig(**sizes, max_position_embeddings=2048, dtype="bfloat16", architectures=["LlamaForCausalLM"])


def build_model(out: Path, shape: str, layers: int | None) -> int:
    """A random Llama of `shape` in bf16, written as HF writes big models: safetensors shards of 4 layers
    each, with an index."""
    import torch
    from safetensors.torch import save_file

    config = llama_config(shape, layers)
    out.mkdir(parents=True)
    config.save_pretrained(out)
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    h, ffn, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = h // config.num_attention_heads * config.num_key_value_heads
    shards, params = [], 0
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shards.append({p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
                       p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
                       p + "mlp.gate_proj.weight": rand(ffn, h), p + "mlp.up_proj.weight": rand(ffn, h),
                       p + "mlp.down_proj.weight": rand(h, ffn),
                       p + "input_layernorm.weight": torch.ones(h).bfloat16(),
                       p + "post_attention_layernorm.weight": torch.ones(h).bfloat16()})
    shards.append({"model.embed_tokens.weight": rand(vocab, h), "lm_head.weight": rand(vocab, h),
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


def as_megatron_lm(ours: Path, out: Path) -> None:
    """A checkpoint laid out as Megatron-LM writes it, from one we converted (same tensors, megatron-core
    names): its `args` become Megatron-LM's own argparse.Namespace (without the dict we carry in it, so
    they are read through the Megatron-LM arg table), and legacy rank files gain the `_extra_state`
    entries Transformer Engine layers save. As `--no-save-optim --no-save-rng` writes it: no optimizer or
    RNG state. torch_dist keeps its .distcp files (hard links) and only its common.pt changes."""
    import argparse

    import torch

    from pipeline.formats.megatron_args import PIPELINE_ARGS

    def megatron_lm_args(args: argparse.Namespace) -> argparse.Namespace:
        return argparse.Namespace(**{k: v for k, v in vars(args).items() if k != PIPELINE_ARGS})

    shutil.copytree(ours, out, copy_function=os.link)
    for file in out.rglob("model_optim_rng.pt"):
        stored = torch.load(file, weights_only=False)
        stored["args"] = megatron_lm_args(stored["args"])
        layers = {k.rsplit(".", 1)[0] for k in stored["model"] if ".linear_" in k}
        stored["model"].update({f"{layer}._extra_state": None for layer in layers})
        file.unlink()  # a hard link to ours: write a new file, not through the link
        torch.save(stored, file)
    for file in out.rglob("common.pt"):
        stored = torch.load(file, weights_only=False)
        stored["args"] = megatron_lm_args(stored["args"])
        file.unlink()
        torch.save(stored, file)


class GeneratedReader:
    """Stands in for pipeline/convert/convert.py's HFReader (names(), get(name, meta)): the model is built
    on the meta device from the src dir's config.json, and each tensor is generated when the converter
    asks for it (a 2 MB random block tiled over it, so that every page is written). Nothing is read
    from disk, so a model the disk could not hold twice can be converted."""

    def __init__(self, path: Path):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
        self.shapes = {n: t.shape for n, t in model.state_dict().items()}
        self.block = (torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()

    def names(self):
        return set(self.shapes)

    def get(self, name: str, meta: bool = False):
        import torch

        if meta:
            return torch.empty(self.shapes[name], dtype=torch.bfloat16, device="meta")
        out = torch.empty(self.shapes[name], dtype=torch.bfloat16)
        flat, n = out.view(-1), self.block.numel()
        for start in range(0, flat.numel(), n):
            part = flat[start:start + n]
            part.copy_(self.block[:part.numel()])
        return out


def generated_source() -> None:
    """In a `pipeline convert` process (MEASURE --generated): the HF source is GeneratedReader."""
    from pipeline.convert import convert

    convert.HFReader = GeneratedReader


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measured(script: str, *args: str) -> tuple:
    """(wall seconds, peak RSS, peak anonymous memory) of MEASURE or FLOOR in a fresh process."""
    fields = result_fields([sys.executable, "-c", script, *args], " ".join(args), cwd=REPO)
    if fields[0] != "0":
        sys.exit(f"{' '.join(args)} exited {fields[0]}")
    return float(fields[1]), int(fields[2]), int(fields[3])


def generated_runs(out: Path, shapes: list) -> dict:
    """HF -> Megatron torch_dist from a GeneratedReader source of each shape, once each; the output is
    deleted right after (the 8B one is 16 GB). Returns name -> (wall, peak RSS, peak anon, model bytes,
    largest tensor bytes)."""
    import torch
    from transformers import AutoModelForCausalLM

    rows = {}
    for shape in shapes:
        config = llama_config(shape)
        with torch.device("meta"):
            sizes = [t.numel() * 2 for t in AutoModelForCausalLM.from_config(config).state_dict().values()]
        src, dst = out / f"generated_{shape}", out / f"generated_{shape}_mg_dist"
        shutil.rmtree(src, ignore_errors=True)
        config.save_pretrained(src)  # config.json only: the tensors are generated
        name = f"generated {shape} ({sum(sizes) / 2e9:.1f}B) HF -> torch_dist"
        free = shutil.disk_usage(out).free
        if free < sum(sizes) * 1.2:
            print(f"skipped {name}: {sum(sizes) / 1e9:.1f} GB to write, {free / 1e9:.1f} GB free at {out}")
            continue
        os.sync()
        try:
            rows[name] = (*measured(MEASURE, "--generated", "convert", f"src={src}", f"dst={dst}", "to=megatron"),
                          sum(sizes), max(sizes))
        finally:
            shutil.rmtree(dst, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="1B", help="the model built on disk")
    ap.add_argument("--layers", type=int, help="its layer count (default: the shape's)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--generated", default="1B,8B", help="shapes converted from a generated source ('' to skip)")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "convert"))
    args = parse_args(ap, {"shape": "smoke", "rounds": 1, "generated": "smoke"})
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    hf = out / "hf"
    params = build_model(hf, args.shape, args.layers)
    size = dir_bytes(hf)
    # Megatron-LM-written inputs (untimed setup): our conversions of hf, re-laid as Megatron-LM writes them;
    # the torch_dist one from the first round's mg_dist
    measured(MEASURE, "convert", f"src={hf}", f"dst={out / 'ours_legacy'}", "to=megatron", "format=torch")
    as_megatron_lm(out / "ours_legacy", out / "megatron_lm_torch")
    shutil.rmtree(out / "ours_legacy")
    vocab = f"vocab_size={SHAPES[args.shape]['vocab_size']}"  # Megatron-LM's args hold only the padded size
    runs = {
        "copytree (baseline)": None,
        "python + torch read/write (floor)": "floor",
        "HF -> Megatron torch_dist": ("to=megatron", hf, "mg_dist"),
        "HF -> Megatron legacy TP2 x PP2": ("to=megatron", hf, "mg_legacy", "tp=2", "pp=2", "format=torch"),
        "Megatron torch_dist -> HF": ("to=hf", "mg_dist", "hf_back"),
        "Megatron-LM torch_dist -> HF": ("to=hf", "megatron_lm_torch_dist", "hf_from_mlm_dist", vocab),
        "Megatron-LM legacy (mp_rank_00) -> HF": ("to=hf", "megatron_lm_torch", "hf_from_mlm_legacy", vocab),
    }
    best = {name: (float("inf"), 0, 0) for name in runs}
    for _ in range(args.rounds):  # interleaved, each conversion in a fresh process
        for name, spec in runs.items():
            dst = out / ("copy" if spec in (None, "floor") else spec[2])
            shutil.rmtree(dst, ignore_errors=True)
            os.sync()  # flush dirty pages, untimed: no run pays for another's writeback
            if spec is None:
                t0 = time.perf_counter()
                shutil.copytree(hf, dst)
                wall, rss, anon = time.perf_counter() - t0, 0, 0
            elif spec == "floor":
                wall, _, _ = measured(FLOOR, str(hf), str(dst))
                rss = anon = 0
            else:
                to, src, _, *extra = spec
                src = src if isinstance(src, Path) else out / src
                if src.name == "megatron_lm_torch_dist" and not src.exists():
                    as_megatron_lm(out / "mg_dist", src)
                wall, rss, anon = measured(MEASURE, "convert", f"src={src}", f"dst={dst}", to, *extra)
            best[name] = (min(best[name][0], wall), max(best[name][1], rss), max(best[name][2], anon))
    copy, floor = best["copytree (baseline)"][0], best["python + torch read/write (floor)"][0]
    print(f"Llama, {params / 1e9:.2f}B parameters, bf16, {size / 1e9:.2f} GB in {len(list(hf.glob('*.safetensors')))} "
          f"safetensors shards; best wall of {args.rounds} interleaved rounds, each conversion in a fresh process\n")
    print(f"{'run':<40} {'seconds':>8} {'vs copy':>8} {'vs floor':>8} {'peak RSS':>10} {'vs ckpt':>8} "
          f"{'peak anon':>10} {'vs ckpt':>8}")
    for name, (wall, rss, anon) in best.items():
        mem = (f"{rss / 1e9:>7.2f} GB {rss / size:>7.2f}x {anon / 1e9:>7.2f} GB {anon / size:>7.2f}x" if rss
               else f"{'-':>10} {'-':>8} {'-':>10} {'-':>8}")
        print(f"{name:<40} {wall:>8.1f} {wall / copy:>7.2f}x {wall / floor:>7.2f}x {mem}")
    print("\ntargets: wall <= 2x the copy, peak RSS <= 0.5x the checkpoint\n")
    for name, (wall, rss, _) in best.items():
        if rss:
            ratio(f"{name} wall", wall / floor, "the torch read/write floor's")
            ratio(f"{name} peak RSS", rss / size, "the checkpoint's size (target <= 0.5x)")
    shutil.rmtree(out, ignore_errors=True)  # what is left is a few GB of scratch

    generated = generated_runs(out, [s for s in args.generated.split(",") if s])
    if not generated:
        return
    print("\nfrom a generated source (built on the meta device, each tensor made when the converter asks for it), "
          "one run each, output deleted after\n")
    print(f"{'run':<40} {'seconds':>8} {'ckpt':>8} {'largest':>8} {'peak RSS':>10} {'vs ckpt':>8} "
          f"{'peak anon':>10} {'vs ckpt':>8}")
    for name, (wall, rss, anon, total, largest) in generated.items():
        print(f"{name:<40} {wall:>8.1f} {total / 1e9:>5.2f} GB {largest / 1e9:>5.2f} GB {rss / 1e9:>7.2f} GB "
              f"{rss / total:>7.2f}x {anon / 1e9:>7.2f} GB {anon / total:>7.2f}x")
    print()
    for name, (_, rss, _, total, _) in generated.items():
        ratio(f"{name} peak RSS", rss / total, "the checkpoint's size")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
