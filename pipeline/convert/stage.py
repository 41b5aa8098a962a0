"""The `import` stage (HF `train.init` -> Megatron, before megatron training) and the `export` stage
(after training: HF always, Megatron on request).

Conversions run in a child process (`pipeline convert`, `pipeline verify`): on a CPU-only host they
load megatron-core's CPU compatibility layer, which rewires torch for the whole process, and the
runner's process should stay as it is. Every conversion is checked by `pipeline verify` (same tokens
through transformers and megatron-core, max |logit difference|); above `export.tolerance` the stage
fails and publishes nothing.

    <run_dir>/import/megatron/    (megatron backend, HF train.init) torch_dist padded for train.parallel.tp
    <run_dir>/export/hf/          safetensors, config.json, generation_config.json, every tokenizer file
    <run_dir>/export/megatron/    (export.megatron=true) torch_dist, loads at any TP/PP
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

from pipeline.config import layout_problem
from pipeline.errors import ConfigError, StageError
from pipeline.formats.checkpoints import legacy_rank_files
from pipeline.models.hf_config import CONFIG_FIELDS
from pipeline.runner import CHECKPOINTS, HF_MODEL, MEGATRON_MODEL, StageContext
from pipeline.train.stage import is_hf_checkpoint, needs_import


def pipeline_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise StageError(f"pipeline {' '.join(args)} failed:\n" + "\n".join(proc.stderr.splitlines()[-15:]))
    return proc


def convert(*pairs: str) -> None:
    pipeline_cli("convert", *pairs)


def verify(hf_dir: Path, megatron_dir: Path, tolerance: float, report_path: Path) -> Dict[str, Any]:
    """Logits of both sides on a fixed prompt (megatron-core at TP=1 here); an error above tolerance."""
    # exit 2 either way: over tolerance (the report says by how much) or could not run (no report)
    proc = pipeline_cli("verify", f"a={hf_dir}", f"b={megatron_dir}", f"tolerance={tolerance}",
                        f"report={report_path}", check=False)
    if not report_path.is_file():
        raise StageError(f"verify {hf_dir} against {megatron_dir} failed:\n"
                         + "\n".join(proc.stderr.splitlines()[-15:]))
    report = json.loads(report_path.read_text())
    if proc.returncode != 0:
        raise StageError(report.get("problem") or f"{megatron_dir} does not reproduce {hf_dir}: max |logit "
                         f"difference| {report['max_abs_diff']:.3g} > tolerance {tolerance}")
    return report


def import_needed(cfg) -> bool:
    return cfg.train.backend == "megatron" and bool(cfg.train.init) and needs_import(cfg.train.init)


def import_inputs(cfg) -> List[str]:
    """The init's files (an HF dir's, or a legacy checkpoint's rank files), so that a changed init
    checkpoint is imported again."""
    if not import_needed(cfg):
        return []
    init = Path(cfg.train.init)
    return sorted(str(p) for p in (init.iterdir() if is_hf_checkpoint(str(init)) else legacy_rank_files(init))
                  if p.is_file())


def run_import(ctx: StageContext) -> Dict[str, Any]:
    """An HF train.init as a Megatron torch_dist checkpoint, padded for the training TP (the train stage
    checks the padding), or a legacy Megatron one (Megatron-LM's, or ours with format=torch) as torch_dist
    with its padding; then checked (an HF one by logits, a legacy one tensor by tensor). Nothing to do for
    the HF backend or a torch_dist init."""
    if not import_needed(ctx.cfg):
        return {"imported": False}
    t, out = ctx.cfg.train, ctx.work_dir / MEGATRON_MODEL
    if is_hf_checkpoint(t.init):
        convert(f"src={t.init}", f"dst={out}", "to=megatron", f"tp={t.parallel.tp}",
                f"make_vocab_size_divisible_by={t.make_vocab_size_divisible_by}")
    else:  # a relayout, no cast: checked tensor by tensor, bit for bit (verify loads legacy files at pp 1 only)
        convert(f"src={t.init}", f"dst={out}", "to=megatron", "format=torch_dist")
        from pipeline.convert.verify import tensor_differences

        found = tensor_differences(Path(t.init), out, ("megatron", "megatron"))
        if found is None or found["differ"]:
            raise StageError(f"{out} does not hold the tensors of train.init {t.init}: "
                             f"{found['differ'][:3] if found else 'other names or shapes'}")
        return {"imported": True, "verify": {"tensors": found["tensors"], "identical": True, "max_abs_diff": 0.0}}
    return {"imported": True, "verify": verify(Path(t.init), out, ctx.cfg.export.tolerance,
                                                 ctx.work_dir / "verify.json")}


def trained_model(train: Path, backend: str) -> Dict[str, Any]:
    """The trained model's model.* settings (the init's shape for continued pretraining), from the train
    stage's output: the megatron checkpoint's stored args (as `pipeline convert` reads them), or the HF
    dir's config.json."""
    if backend == "megatron":
        from pipeline.convert.megatron_io import read_args

        return read_args(train / CHECKPOINTS)[1]["model"]
    config = json.loads((train / HF_MODEL / "config.json").read_text())
    fields = CONFIG_FIELDS.get(config.get("model_type"), CONFIG_FIELDS["llama"])  # Mistral & co: Llama's names
    return {ours: config.get(hf) for ours, hf in fields.items()}


def check_export_layout(train: Path, backend: str, tp: int) -> None:
    """export.tp divides the model (pipeline convert's and training's rule), checked before the export
    converts anything rather than when its last conversion refuses it."""
    m = trained_model(train, backend)
    heads = m["num_attention_heads"]
    problem = layout_problem(tp, 1, heads, m.get("num_key_value_heads") or heads,
                             m.get("ffn_hidden_size") or 4 * m["hidden_size"], m["num_layers"])
    if problem:
        raise ConfigError(f"export.tp: {problem[1]} (the model trained in {train}); nothing was exported")


def run_export(ctx: StageContext) -> Dict[str, Any]:
    cfg, train = ctx.cfg.export, ctx.inputs["train"]
    out = ctx.work_dir  # the stage's own fresh work dir: the conversions' destinations are always new
    dtype: List[str] = [f"dtype={cfg.dtype}"] if cfg.dtype else []
    metrics: Dict[str, Any] = {}
    if cfg.megatron:
        check_export_layout(train, ctx.cfg.train.backend, cfg.tp)
    if ctx.cfg.train.backend == "megatron":
        checkpoints = train / CHECKPOINTS
        convert(f"src={checkpoints}", f"dst={out / HF_MODEL}", "to=hf", *dtype)
        metrics["hf_vs_trained"] = verify(out / HF_MODEL, checkpoints, cfg.tolerance, out / "verify_hf.json")
    else:  # the HF backend's train stage already wrote an HF dir with every tokenizer file
        shutil.copytree(train / HF_MODEL, out / HF_MODEL)
    if cfg.megatron:
        convert(f"src={out / HF_MODEL}", f"dst={out / MEGATRON_MODEL}", "to=megatron", f"tp={cfg.tp}",
                f"make_vocab_size_divisible_by={cfg.make_vocab_size_divisible_by}", *dtype)
        metrics["megatron_vs_hf"] = verify(out / HF_MODEL, out / MEGATRON_MODEL, cfg.tolerance,
                                           out / "verify_megatron.json")
    return metrics
