"""Same tokens through two checkpoints, each an HF dir (config.json) or a Megatron checkpoint
(latest_checkpointed_iteration.txt + iter_*/): max |logit difference|, KL divergence and top-1
agreement, at a context long enough to exercise RoPE scaling.

    pipeline verify a=<dir> b=<dir> [seq_len=N tolerance=1e-4 tp=N report=<json>]
    pipeline convert ... verify=true       (`run` on the finished <dst>.partial, before it is published)
    torchrun --nproc_per_node <tp> -m pipeline.convert.verify <a> <b> <out.json> <seq_len> <tolerance>

`run` is the one entry point: HF vs HF in the calling process (`compare`); a Megatron side on either
side (Megatron vs Megatron too) under one torchrun (`main`) at the TP `launch_tp` picks: a legacy
side's own TP (two legacy sides must share it), else `tp=`, else 1; every Megatron side must divide
at it (heads, key/value heads, FFN, padded vocab: pipeline/config.py `layout_problem`). A Megatron
side is loaded at TP = the number of processes (PP 1), through the megatron backend's own model
builder: a torch_dist checkpoint through its checkpoint loader (any layout), a legacy one by loading
each rank's file into that rank's module with strict names and shapes. The vocab-parallel logits
are gathered across TP and cut to the true vocabulary. HF sides run on rank 0, on the CPU, in fp32;
rank 0 writes the report. `run` returns it whether or not it passed; a side that cannot be read or
loaded is a ConfigError / ConversionError (the CLI: exit 2, as for a report that did not pass).

The context is `seq_len` positions (default 1024, capped at the smaller max_position_embeddings of
the two, which the report and the log line say). The report holds:
- `max_abs_diff`: max |logit a - logit b| over every position and token of the vocabulary;
- `kl_divergence`: KL(softmax(a) || softmax(b)), the mean over positions;
- `top1_agreement`: the fraction of positions whose argmax agree;
- `diff_by_position`: the max |diff| in each of 8 equal windows of positions, and `position_growth`,
  the last window's over the first's (a diff that grows with position points at RoPE);
- `config_differences` and `likely_causes`: what the two configs (HF config.json as model.*, or the
  Megatron stored args) disagree on: RoPE settings, vocabulary and its padding, norm eps, head_dim;
- on a failure, `tensor_differences`: both sides' tensors read again one pair at a time under
  megatron-core's names (the embedding cut to the true vocabulary), each that differs with its max
  |diff|. The likely causes then name the tensor families that differ (`decoder.layers.*.mlp.linear_fc2.weight
  (layers [1])`), or say the weights are identical, so the difference is in the settings.
`problem`, the error line, names both sides, the max diff and the likely causes.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from pipeline.config import layout_problem as split_problem
from pipeline.convert.convert import HFReader, geometry
from pipeline.convert.megatron_io import checkpoint_path, legacy_ranks, load_legacy, read_args, read_tensors
from pipeline.errors import ConfigError, ConversionError
from pipeline.formats.checkpoints import TRACKER
from pipeline.models import FAMILIES, by_architecture
from pipeline.models.hf_config import CONFIG_FIELDS, ffn_size, model_from_hf
from pipeline.models.mapping import Vocab

REPORT = "verify.json"  # the report's default name, in side b
SEQ_LEN = 1024  # default context: past the original context of the RoPE-scaled families we test
TOLERANCE = 1e-4  # max |logit difference| in fp32
WINDOWS = 8  # diff_by_position: this many equal windows of positions
# Megatron-LM's files use Transformer Engine's names for the norms fused into the next linear layer;
# megatron-core's local layers (the CPU path) call them as below
LOCAL_NAMES = {"self_attention.linear_qkv.layer_norm_": "input_layernorm.",
               "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm."}
ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
             "rope_original_max_position_embeddings")
VOCAB_KEYS = ("vocab_size", "padded_vocab_size", "make_vocab_size_divisible_by")


# ----------------------------------------------------------------------------- the two sides

def side_kind(path: Path) -> str:
    """'hf' (a config.json), 'megatron' (a tracker file or iter_* dirs), or a ConversionError naming the dir."""
    if (path / "config.json").is_file():
        return "hf"
    if (path / TRACKER).is_file() or any(path.glob("iter_*")):
        return "megatron"
    what = "does not exist" if not path.exists() else "has neither config.json (HF) nor " \
        f"{TRACKER} / iter_*/ (Megatron)"
    raise ConversionError(f"{path}: {what}; verify compares HF dirs and Megatron checkpoint dirs")


def megatron_layout(path: Path) -> Optional[Tuple[int, int]]:
    """(tp, pp) of a legacy checkpoint, None for torch_dist (it loads at any layout)."""
    ranks = legacy_ranks(checkpoint_path(path))
    if not ranks:
        return None
    return max(t for t, _ in ranks) + 1, max(p for _, p in ranks) + 1


def layout_problem(layouts: List[Optional[Tuple[int, int]]], tp: Optional[int]) -> Tuple[Optional[str], int]:
    """(a reason verify cannot load these sides together, or None; the TP to run at). A legacy
    checkpoint is loaded at its own TP and PP 1."""
    legacy = [lay for lay in layouts if lay]
    if any(pp > 1 for _, pp in legacy):
        return "a legacy (format=torch) checkpoint with pp > 1 cannot be verified (verify loads legacy files at " \
               "pp 1); convert it to torch_dist or pp=1 first", 1
    tps = {t for t, _ in legacy}
    if len(tps) > 1:
        return f"legacy checkpoints at tp {' and '.join(map(str, sorted(tps)))} cannot be loaded in one run; " \
               f"convert one to torch_dist first", 1
    if tps and tp is not None and tp not in tps:
        return f"tp={tp}: a legacy checkpoint loads only at its own tp {next(iter(tps))}", 1
    return None, (next(iter(tps)) if tps else tp or 1)


def launch_tp(paths: Tuple[Path, Path], kinds: Tuple[str, str], tp: Optional[int]) -> int:
    """The TP the torchrun runs at (layout_problem), with every Megatron side divisible at it; a ConfigError
    naming the side otherwise."""
    problem, tp = layout_problem([megatron_layout(p) for p, k in zip(paths, kinds) if k == "megatron"], tp)
    if problem:
        raise ConfigError(problem)
    for path, kind in zip(paths, kinds):
        if kind == "megatron":
            args = read_args(path)[1]
            m = args["model"]
            heads = m["num_attention_heads"]
            split = split_problem(tp, 1, heads, m.get("num_key_value_heads") or heads, ffn_size(m), m["num_layers"],
                                  padded_vocab=args["padded_vocab_size"])
            if split:
                raise ConfigError(f"tp={tp}: {path}: {split[1]}; verify it at a tp that divides it (tp=1 always "
                                  f"does for torch_dist)")
    return tp


def hf_settings(path: Path) -> Dict[str, Any]:
    """An HF config.json as model.* (pipeline/models/hf_config.py), with the vocabulary; a config the
    family table refuses is read by its mapped names only."""
    config = json.loads((path / "config.json").read_text())
    try:
        model = model_from_hf(config, by_architecture((config.get("architectures") or ["?"])[0]))
    except Exception:  # a diagnosis, not a conversion: take what the names give
        fields = CONFIG_FIELDS.get(config.get("model_type"), CONFIG_FIELDS["llama"])
        model = {ours: config.get(hf) for ours, hf in fields.items() if hf}
        model["rope_theta"] = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta"))
    model["vocab_size"] = config.get("vocab_size")
    return model


def megatron_settings(path: Path) -> Dict[str, Any]:
    _, args = read_args(path)
    return {**args["model"], **{k: args.get(k) for k in VOCAB_KEYS}}


def settings(path: Path, kind: str) -> Dict[str, Any]:
    return hf_settings(path) if kind == "hf" else megatron_settings(path)


def resolved_head_dim(m: Dict[str, Any]) -> Optional[int]:
    if m.get("head_dim"):
        return m["head_dim"]
    if m.get("hidden_size") and m.get("num_attention_heads"):
        return m["hidden_size"] // m["num_attention_heads"]
    return None


def config_differences(a: Dict[str, Any], b: Dict[str, Any], kinds: Tuple[str, str]) -> Dict[str, List[Any]]:
    """key -> [a's value, b's value] for every model setting both sides state and disagree on. An HF
    side has no padded embedding: padding is compared only between two Megatron sides."""
    a, b = dict(a), dict(b)
    a["head_dim"], b["head_dim"] = resolved_head_dim(a), resolved_head_dim(b)
    out = {}
    for key in sorted(set(a) & set(b)):
        if key in ("padded_vocab_size", "make_vocab_size_divisible_by") and kinds != ("megatron", "megatron"):
            continue
        va, vb = a[key], b[key]
        if va is None or vb is None:
            continue
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not isinstance(va, bool):
            if float(va) == float(vb):
                continue
        elif va == vb:
            continue
        out[key] = [va, vb]
    return out


def shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def likely_causes(diffs: Dict[str, List[Any]]) -> List[str]:
    """One line per kind of setting that differs, most telling first."""
    def listed(keys):
        return ", ".join(f"{k} {shown(diffs[k][0])} vs {shown(diffs[k][1])}" for k in keys)

    groups = [("rope settings differ", [k for k in ROPE_KEYS if k in diffs]),
              ("vocab differs", [k for k in ("vocab_size",) if k in diffs]),
              ("vocab padding differs", [k for k in ("padded_vocab_size", "make_vocab_size_divisible_by")
                                         if k in diffs]),
              ("norm eps differs", [k for k in ("norm_eps",) if k in diffs]),
              ("head_dim differs", [k for k in ("head_dim",) if k in diffs])]
    causes = [f"{what}: {listed(keys)}" for what, keys in groups if keys]
    named = {k for _, keys in groups for k in keys}
    rest = [k for k in diffs if k not in named]
    if rest:
        causes.append(f"other settings differ: {listed(rest)}")
    return causes


def max_positions(m: Dict[str, Any]) -> Optional[int]:
    return m.get("max_position_embeddings")


def plan_seq_len(requested: Optional[int], a: Dict[str, Any], b: Dict[str, Any]) -> Tuple[int, Optional[str]]:
    """The context to compare at, and a note when the models' max_position_embeddings capped it."""
    want = requested or SEQ_LEN
    limits = [n for n in (max_positions(a), max_positions(b)) if n]
    if limits and min(limits) < want:
        return min(limits), f"seq_len {want} capped at the models' max_position_embeddings {min(limits)}"
    return want, None


def prompt(vocab: int, seq_len: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- logits

def to_module_names(shard, module):
    """A legacy shard's names as this module's state_dict spells them."""
    own = set(module.state_dict())
    out = {}
    for name, tensor in shard.items():
        if name not in own:
            for te, local in LOCAL_NAMES.items():
                name = name.replace(te, local)
        out[name] = tensor
    return out


def megatron_logits(ckpt_root: Path, tokens: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from pipeline.train.job import Parallel, TrainJob, TrainSettings
    from pipeline.train.mcore import checkpoint
    from pipeline.train.mcore import model as models

    path, args = read_args(ckpt_root)
    tp = dist.get_world_size()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tp, 1)
        tensor_parallel.model_parallel_cuda_manual_seed(0)
    # the job of a training run at this layout, as far as building its model needs one
    parallel = Parallel(tp=tp, pp=1, vpp=None, sequence_parallel=False, distributed_optimizer=False, recompute="none")
    job = TrainJob(model=args["model"], train=TrainSettings(parallel=parallel),
                   padded_vocab_size=args["padded_vocab_size"])
    model = models.build_model(job, models.transformer_config(job, "fp32"))
    ranks = legacy_ranks(path)
    if ranks:  # a legacy file per rank: this rank's shard goes straight into the module, names checked
        if set(ranks) != {(t, 0) for t in range(tp)}:
            raise SystemExit(f"{path} is a legacy checkpoint for {len(ranks)} ranks; verify it with tp = its TP "
                             f"size and pp 1, or convert it to torch_dist first")
        shard = load_legacy(ranks[(ps.get_tensor_model_parallel_rank(), 0)])["model"]
        model[0].module.load_state_dict(to_module_names(shard, model[0].module), strict=True)
    else:
        checkpoint.load_checkpoint(path, model, None, None, {})
    model[0].eval()
    seq = tokens.shape[1]
    mask = torch.ones(1, 1, seq, seq, dtype=torch.bool, device=tokens.device).triu(1)  # True = masked (future)
    with torch.no_grad():
        logits = model[0](tokens, torch.arange(seq, device=tokens.device).unsqueeze(0), mask)
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return logits[..., :args["vocab_size"]].float()


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(tokens).logits.float()


# ----------------------------------------------------------------------------- the weights

def global_tensors(path: Path, kind: str):
    """(megatron-core name, global tensor) for every tensor of a side, in the family table's order, the
    embedding and output layer cut to the true vocabulary; and the list of names, read first."""
    if kind == "hf":
        config = json.loads((path / "config.json").read_text())
        family = by_architecture((config.get("architectures") or ["?"])[0])
        model, vocab = model_from_hf(config, family), config["vocab_size"]
        reader, geo = HFReader(path), geometry(model, vocab, vocab)  # padded = true vocab: no padding
        entries = [(m, meg) for m, meg, _ in family.expanded(model["num_layers"], model["tie_word_embeddings"])]
        stream = ((meg, m.to_megatron([reader.get(n) for n in m.hf], geo)) for m, meg in entries)
    else:
        path, args = read_args(path)
        model, vocab = args["model"], args["vocab_size"]
        family = FAMILIES[model["family"]]
        entries = [(m, meg) for m, meg, _ in family.expanded(model["num_layers"], model["tie_word_embeddings"])]
        vocab_rows = {meg for m, meg in entries if isinstance(m, Vocab)}
        stream = ((meg, t[:vocab] if meg in vocab_rows else t) for meg, t in read_tensors(path, args, entries))
    return [meg for _, meg in entries], stream


def tensor_differences(a: Path, b: Path, kinds: Tuple[str, str]) -> Optional[Dict[str, Any]]:
    """Which tensors differ, compared one pair at a time under megatron-core's names: {"tensors": n,
    "differ": [[name, max |diff|], ...] largest first}; None when the two sides do not have the same
    tensors of the same shapes (their settings differ: config_differences says how)."""
    names_a, stream_a = global_tensors(a, kinds[0])
    names_b, stream_b = global_tensors(b, kinds[1])
    if names_a != names_b:
        return None
    differ = []
    for (name, ta), (_, tb) in zip(stream_a, stream_b):
        if ta.shape != tb.shape:
            return None
        diff = float((ta.double() - tb.double()).abs().max()) if ta.numel() else 0.0
        if diff > 0:
            differ.append([name, diff])
    return {"tensors": len(names_a), "differ": sorted(differ, key=lambda d: -d[1])}


def weights_cause(found: Optional[Dict[str, Any]]) -> Optional[str]:
    """The likely cause a tensor comparison gives: the tensor families that differ (layers folded into
    `*`), or that the weights are identical."""
    if found is None:
        return None
    if not found["differ"]:
        return f"the weights are identical ({found['tensors']} tensors): the difference is in how they are run"
    families: Dict[str, List] = {}
    for name, diff in found["differ"]:
        layer = re.search(r"layers\.(\d+)\.", name)
        entry = families.setdefault(re.sub(r"layers\.\d+\.", "layers.*.", name), [[], 0.0])
        entry[0] += [int(layer.group(1))] if layer else []
        entry[1] = max(entry[1], diff)
    shown_families = [f"{fam}{f' (layers {sorted(layers)})' if layers else ''}: max |diff| {diff:.3g}"
                      for fam, (layers, diff) in list(families.items())[:5]]
    more = f" and {len(families) - 5} more" if len(families) > 5 else ""
    return f"weights differ in {len(found['differ'])} of {found['tensors']} tensors: " \
           f"{'; '.join(shown_families)}{more}"


# ----------------------------------------------------------------------------- the report

def metrics(la: torch.Tensor, lb: torch.Tensor) -> Dict[str, Any]:
    """max |diff|, mean KL(softmax(a) || softmax(b)), top-1 agreement and the diff by position window,
    over the vocabulary both sides share."""
    vocab = min(la.shape[-1], lb.shape[-1])
    la, lb = la[0, :, :vocab].double(), lb[0, :, :vocab].double()
    diff = (la - lb).abs().amax(-1)  # per position
    pa, pb = torch.log_softmax(la, -1), torch.log_softmax(lb, -1)
    kl = (pa.exp() * (pa - pb)).sum(-1).clamp_min(0)
    seq = diff.shape[0]
    edges = [round(i * seq / WINDOWS) for i in range(WINDOWS + 1)]
    windows = [{"positions": [lo, hi - 1], "max_abs_diff": float(diff[lo:hi].max())}
               for lo, hi in zip(edges, edges[1:]) if hi > lo]
    first, last = windows[0]["max_abs_diff"], windows[-1]["max_abs_diff"]
    return {"max_abs_diff": float(diff.max()), "kl_divergence": float(kl.mean()),
            "top1_agreement": float((la.argmax(-1) == lb.argmax(-1)).double().mean()),
            "diff_by_position": windows, "position_growth": (last / first) if first > 0 else (0.0 if last == 0 else
                                                                                              float("inf"))}


def finish(report: Dict[str, Any], a: Path, b: Path, kinds: Tuple[str, str], sa: Dict[str, Any],
           sb: Dict[str, Any], tolerance: float) -> Dict[str, Any]:
    """The pass/fail verdict, the config differences, and a failure's explanation."""
    diffs = config_differences(sa, sb, kinds)
    causes = likely_causes(diffs)
    passed = report["max_abs_diff"] <= tolerance
    if not passed:
        try:
            report["tensor_differences"] = tensor_differences(a, b, kinds)
        except Exception as e:  # a diagnosis only: the verdict and the report stand without it
            report["tensor_differences"], report["tensor_differences_error"] = None, f"{type(e).__name__}: {e}"
        causes += [c for c in [weights_cause(report["tensor_differences"])] if c]
    grows = report["position_growth"] > 4 and report["diff_by_position"][-1]["max_abs_diff"] > tolerance
    if not passed and grows:
        w0, w1 = report["diff_by_position"][0], report["diff_by_position"][-1]
        causes.append(f"the diff grows with position ({w0['max_abs_diff']:.3g} at positions "
                      f"{w0['positions'][0]}-{w0['positions'][1]}, {w1['max_abs_diff']:.3g} at "
                      f"{w1['positions'][0]}-{w1['positions'][1]}): this suggests RoPE (theta or scaling)")
    report.update({"a": str(a), "b": str(b), "kinds": list(kinds), "tolerance": tolerance, "passed": passed,
                   "config_differences": diffs, "likely_causes": causes if not passed else []})
    if not passed:
        report["problem"] = failure_message(report)
    return report


def failure_message(report: Dict[str, Any]) -> str:
    a, b = report["a"], report["b"]
    ka, kb = report["kinds"]
    head = (f"b ({kb}: {b}) does not reproduce a ({ka}: {a}) at {report['seq_len']} positions: max |logit "
            f"difference| {report['max_abs_diff']:.3g} > tolerance {report['tolerance']:g} (KL "
            f"{report['kl_divergence']:.3g}, top-1 agreement {report['top1_agreement']:.3f})")
    causes = report.get("likely_causes") or ["the configs agree on every setting compared and the tensors could "
                                             "not be compared one by one"]
    return head + "; " + "; ".join(causes)


def summary(report: Dict[str, Any]) -> str:
    """The log line."""
    verdict = "OK" if report["passed"] else "FAILED"
    cap = f" ({report['seq_len_note']})" if report.get("seq_len_note") else ""
    return (f"verify {verdict}: max |logit diff| {report['max_abs_diff']:.3g} (tolerance {report['tolerance']:g}), "
            f"KL {report['kl_divergence']:.3g}, top-1 agreement {report['top1_agreement']:.4f} over "
            f"{report['seq_len']} positions{cap}")


def prepare(a: Path, b: Path, seq_len: Optional[int]):
    kinds = (side_kind(a), side_kind(b))
    sa, sb = settings(a, kinds[0]), settings(b, kinds[1])
    seq, note = plan_seq_len(seq_len, sa, sb)
    vocab = min(v for v in (sa.get("vocab_size"), sb.get("vocab_size")) if v)
    return kinds, sa, sb, seq, note, prompt(vocab, seq)


def compare(a: Path, b: Path, out: Optional[Path], seq_len: Optional[int] = None,
            tolerance: float = TOLERANCE) -> Dict[str, Any]:
    """Two HF dirs, in this process (no torchrun needed)."""
    kinds, sa, sb, seq, note, tokens = prepare(a, b, seq_len)
    if kinds != ("hf", "hf"):
        raise ConversionError("compare() runs HF vs HF only; a Megatron side runs under torchrun (main)")
    report = {**metrics(hf_logits(a, tokens), hf_logits(b, tokens)), "seq_len": seq, "seq_len_note": note, "tp": None}
    report = finish(report, a, b, kinds, sa, sb, tolerance)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    return report


def main(a: str, b: str, out: str, seq_len: str = "0", tolerance: str = str(TOLERANCE)) -> None:
    """Under torchrun: any two sides, at least one of them Megatron."""
    import torch.distributed as dist

    from pipeline.train.mcore import cpu

    pa, pb = Path(a), Path(b)
    kinds, sa, sb, seq, note, tokens = prepare(pa, pb, int(seq_len) or None)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    # HF first: the CPU compatibility layer below rewires torch for megatron-core, and a transformers
    # model loaded after it gets uninitialised rotary buffers
    logits: List[Optional[torch.Tensor]] = [hf_logits(p, tokens) if k == "hf" and rank0 else None
                                            for p, k in zip((pa, pb), kinds)]
    cuda = torch.cuda.is_available()
    if not cuda:
        cpu.install()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = "cuda" if cuda else "cpu"
    for i, (p, k) in enumerate(zip((pa, pb), kinds)):
        if k == "megatron":
            logits[i] = megatron_logits(p, tokens.to(device)).cpu()
    if dist.get_rank() == 0:
        report = {**metrics(logits[0], logits[1]), "seq_len": seq, "seq_len_note": note, "tp": dist.get_world_size()}
        report = finish(report, pa, pb, kinds, sa, sb, float(tolerance))
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
    dist.barrier()
    dist.destroy_process_group()


def run(a: Path, b: Path, out: Optional[Path] = None, seq_len: Optional[int] = None,
        tolerance: float = TOLERANCE, tp: Optional[int] = None) -> Dict[str, Any]:
    """Verify a against b (`pipeline verify`, `pipeline convert verify=true`): the report, also written to
    `out` (default <b>/verify.json), passed or not. HF vs HF here, any Megatron side under torchrun."""
    out = out or b / REPORT
    kinds = (side_kind(a), side_kind(b))
    if kinds == ("hf", "hf"):
        return compare(a, b, out, seq_len, tolerance)
    nproc = launch_tp((a, b), kinds, tp)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "pipeline.convert.verify", str(a), str(b), str(out), str(seq_len or 0), str(tolerance)]
    if out.exists():
        out.unlink()  # an older report must not pass for this one
    if subprocess.run(cmd).returncode != 0 or not out.is_file():
        raise ConversionError(f"verify {a} against {b} did not run to the end (torchrun, tp {nproc}); see the "
                              f"output above")
    return json.loads(out.read_text())


class ConvertCheck:
    """`pipeline convert ... verify=true`: src against the complete output (convert.py publishing)."""

    def __init__(self, src: Path, seq_len: Optional[int], tolerance: float):
        self.src, self.seq_len, self.tolerance = src, seq_len, tolerance

    def __call__(self, out: Path) -> Dict[str, Any]:
        return run(self.src, out, None, self.seq_len, self.tolerance)

    def moved(self, where: Path, named: Path) -> Tuple[Dict[str, Any], Path]:
        """The report of a side verified at one path (a <dst>.partial), now at `where`: it names `named`."""
        path = where / REPORT
        report = json.loads(path.read_text())
        report["b"] = str(named)
        if not report["passed"]:
            report["problem"] = failure_message(report)
        path.write_text(json.dumps(report, indent=2))
        return report, path


if __name__ == "__main__":
    main(*sys.argv[1:6])
