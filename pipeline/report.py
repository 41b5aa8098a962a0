"""The end of a run: what it made and where, printed, and written to <run_dir>/report.md with a loss curve.

It reads only what the stages published (manifests, train_summary.json, train_log.jsonl, mix_report.json),
after the runner is done, and writes only into the run dir's top level (report.md, loss_curve.png): no
stage's output, so no fingerprint depends on it, and a run whose stages all skip writes it again unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from pipeline.files import read_json
from pipeline.runner import HF_MODEL, MANIFEST, MEGATRON_MODEL, STEP_LOG, SUMMARY, SWANLOG

REPORT = "report.md"
CURVE = "loss_curve.png"
# (stage, path in its dir, what it is, how to load it); {path} is the absolute path, rows whose path is
# absent are left out. The first HF model listed is the run's model.
OUTPUTS = (
    ("export", HF_MODEL, "HF model (exported)", 'AutoModelForCausalLM.from_pretrained("{path}")'),
    ("train", HF_MODEL, "HF model (train stage, best by eval loss)", 'AutoModelForCausalLM.from_pretrained("{path}")'),
    ("export", MEGATRON_MODEL, "Megatron checkpoint (exported)", "train.init={path}, or pipeline convert"),
    ("train", "{checkpoint}", "last training checkpoint", "a rerun with more steps resumes from it"),
    ("tokenizer", "", "tokenizer", 'AutoTokenizer.from_pretrained("{path}")'),
    ("mix", "train.bin", "mixed token data (.bin/.idx)", "Megatron-LM --data-path {prefix}"),
)


def _published(run_dir: Path, stage: str) -> bool:
    return (run_dir / stage / MANIFEST).is_file()


def outputs(run_dir: Path, summary: Dict[str, Any]) -> List[Dict[str, str]]:
    rows = []
    for stage, rel, what, load in OUTPUTS:
        rel = rel.format(checkpoint=summary.get("checkpoint") or "")
        path = run_dir / stage / rel
        if _published(run_dir, stage) and path.exists() and (rel or stage == "tokenizer"):
            rows.append({"what": what, "path": str(path), "load": load.format(path=path, prefix=path.with_suffix(""))})
    return rows


def mix_shares(run_dir: Path) -> Dict[str, Dict[str, float]]:
    """source -> achieved and target share of the train split."""
    report = read_json(run_dir / "mix" / "mix_report.json") or {}
    sources = ((report.get("splits") or {}).get("train") or {}).get("sources") or {}
    return {name: {"achieved": s["achieved_share"], "target": s["target_share"]} for name, s in sources.items()}


def step_rows(run_dir: Path) -> List[Dict[str, float]]:
    path = run_dir / "train" / STEP_LOG
    if not path.is_file():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows[(row["step"], "loss" in row)] = row  # a resumed run's later entry for a step wins
    return [rows[k] for k in sorted(rows)]


def draw_curve(rows: List[Dict[str, float]], path: Path) -> bool:
    """Train and eval loss by step, with matplotlib's Agg backend (no display needed)."""
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label, style in ((train, "train loss", "-"), (evals, "eval loss", "o-")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _num(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def metric_lines(run_dir: Path, summary: Dict[str, Any]) -> List[str]:
    """Losses, tokens, time, the mix's shares and the dashboard: one line each."""
    lines = []
    if summary:
        lines.append(f"train loss: first {_num(summary.get('first_loss'), '.4f')}, final "
                     f"{_num(summary.get('final_loss'), '.4f')} (mean {_num(summary.get('train_loss'), '.4f')}); "
                     f"eval loss {_num(summary.get('eval_loss'), '.4f')}")
        lines.append(f"tokens: {_num(summary.get('tokens_seen'), ',')} in {summary.get('steps')} steps; wall "
                     f"{_num(summary.get('wall_seconds'), ',.1f')} s (this launch); "
                     f"{_num(summary.get('tokens_per_second'), ',.0f')} tokens/s"
                     + (f", MFU {summary['mfu']:.1%}" if summary.get("mfu") is not None else ""))
    shares = mix_shares(run_dir)
    if shares:
        lines.append("mix (train split, achieved / target): " + ", ".join(
            f"{name} {s['achieved']:.1%} / {s['target']:.1%}" for name, s in shares.items()))
    if (run_dir / "train" / SWANLOG).is_dir():
        lines.append(f"dashboard: swanlab watch {run_dir / 'train' / SWANLOG}")
    return lines


def write(run_dir: Path) -> List[str]:
    """report.md (and the loss curve) in the run dir; returns the summary to print, line by line."""
    summary = (read_json(run_dir / "train" / SUMMARY) if _published(run_dir, "train") else None) or {}
    rows, metrics = outputs(run_dir, summary), metric_lines(run_dir, summary)
    curve = _published(run_dir, "train") and draw_curve(step_rows(run_dir), run_dir / CURVE)
    md = ["# Run report", "", f"Run dir: `{run_dir}`", ""]
    if rows:
        md += ["| output | path | how to load |", "|---|---|---|"]
        md += [f"| {r['what']} | `{r['path']}` | `{r['load']}` |" for r in rows] + [""]
    md += [f"- {line}" for line in metrics]
    if curve:
        md += ["", f"![loss curve]({CURVE})"]
    (run_dir / REPORT).write_text("\n".join(md) + "\n")
    printed = [f"run dir: {run_dir}"]
    for r in rows:
        printed += [f"  {r['what']}: {r['path']}", f"      load: {r['load']}"]
    return printed + [f"  {line}" for line in metrics] + [f"  report: {run_dir / REPORT}"]
