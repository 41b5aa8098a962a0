"""kill -9 the driver of each stage at seeded random points, rerun, compare with an uninterrupted run.

    python tests/faults/kill_points.py --points 20            # make test-faults: every stage, a table
    python tests/faults/kill_points.py --points 2 --stages tokenize,mix --seed 3

For each stage: build the stages before it once, run the stage alone uninterrupted (the reference, and
its duration T), then for each point copy the upstream run dir, start the stage, SIGKILL only the
driver (`pipeline run`, as the OOM killer would) after a delay drawn from [0.2 s, T], check that every
process it had started is gone within CHILDREN_GONE_S, rerun, and compare the stage's output with the
reference: byte for byte for data and conversions; for training the losses after the resume point and
the final model's tensors, to float rounding. No `.partial` dir or temp file may be left.
The table lists, per stage: kills tried, runs completed on rerun, outputs identical.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from conftest import SAMPLE, SOURCES, fast_overrides  # noqa: E402

CHILDREN_GONE_S = 15  # every process the killed driver started must be gone by then
TRAIN_STEPS = ("train.max_steps=12", "train.save_every=4", "train.eval_every=4", "train.tracker=none",
               "train.logging_steps=1")
MEGATRON = ("experiment=tiny_cpu_megatron", "model.num_layers=2", "train.parallel.tp=2")
IGNORED = ("MANIFEST.json", "train.log", "train_node", "launcher_logs", "swanlog", "train_summary.json",
           "train_log.jsonl", "verify", "dataset_cache")  # timings, logs, caches: not the artifact


@dataclass
class Case:
    name: str
    stage: str  # what `--only` runs and what is compared
    upstream: Tuple[str, ...]  # the stages built once before it
    overrides: Tuple[str, ...] = ()
    compare: str = "bytes"  # bytes | train


DATA = ("tokenizer", "tokenize", "mix")
CASES: Dict[str, Case] = {c.name: c for c in (
    Case("tokenizer", "tokenizer", ()),
    Case("tokenize", "tokenize", ("tokenizer",), ("data.tokenize.shard_bytes=16384", "data.tokenize.workers=2")),
    Case("mix", "mix", ("tokenizer", "tokenize")),
    Case("import", "import", DATA, MEGATRON + ("train.init={init}",)),
    Case("train_hf", "train", DATA + ("import",), TRAIN_STEPS, "train"),
    Case("train_megatron", "train", DATA + ("import",), MEGATRON + TRAIN_STEPS, "train"),
    Case("export", "export", DATA + ("import", "train"), TRAIN_STEPS),
)}


def pipeline(*args: str) -> subprocess.Popen:
    # its own session, as a shell job would be: the kill below reaches the driver alone
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_ok(*args: str) -> float:
    started = time.time()
    proc = pipeline(*args)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline {' '.join(args)} failed:\n{err[-3000:]}")
    return time.time() - started


def tiny_hf_init(path: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(path)
    return path


def artifact_files(stage_dir: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(stage_dir)): p.read_bytes() for p in sorted(stage_dir.rglob("*"))
            if p.is_file() and not any(part.startswith(IGNORED) for part in p.relative_to(stage_dir).parts)}


def same_training(reference: Path, rerun: Path, resumed_from: int) -> List[str]:
    """Losses after the resume point and the final model, to float rounding."""
    import torch
    from safetensors.torch import load_file

    def losses(d):
        rows = [json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    problems = []
    ref_eval, got_eval = (json.loads((d / "train_summary.json").read_text())["eval_loss"] for d in (reference, rerun))
    if abs(ref_eval - got_eval) > 1e-5:
        problems.append(f"final eval loss {got_eval} vs {ref_eval}")
    ref, got = losses(reference), losses(rerun)
    for step in (s for s in ref if s > resumed_from):
        if step not in got or abs(got[step] - ref[step]) > 1e-5:
            problems.append(f"loss at step {step}: {got.get(step)} vs {ref[step]}")
    for f in sorted((reference / "hf").glob("*.safetensors")):  # the HF backend's model; megatron's: eval loss
        a, b = load_file(f), load_file(rerun / "hf" / f.name)
        problems += [f"tensor {k}" for k in a if not torch.allclose(a[k], b[k], atol=1e-5, rtol=0)]
    return problems


def leftovers(run_dir: Path) -> List[str]:
    return [str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
            if p.name.endswith((".partial", ".tmp")) or p.name.startswith(".tmp")]


def kill_and_rerun(name: str, case: Case, upstream: Path, reference: Path, duration: float, rng: random.Random,
                   work: Path, index: int) -> Dict[str, bool]:
    run_dir = work / f"{name}-{index}"
    shutil.copytree(upstream, run_dir, symlinks=True)
    args = ["run", *overrides(case, run_dir), "--only", case.stage]
    proc = pipeline(*args)
    time.sleep(rng.uniform(0.2, duration))
    driver = psutil.Process(proc.pid)
    try:
        started = driver.children(recursive=True)
    except psutil.NoSuchProcess:
        started = []
    proc.kill()
    proc.communicate()
    _, alive = psutil.wait_procs(started, timeout=CHILDREN_GONE_S)
    for p in alive:  # report, then clean up so that the next point starts clean
        p.kill()
    try:
        run_ok(*args)
        completed = True
    except RuntimeError as e:
        print(e, file=sys.stderr)
        completed = False
    identical = completed and not leftovers(run_dir)
    if identical and case.compare == "train":
        summary = json.loads((run_dir / "train" / "train_summary.json").read_text())
        problems = same_training(reference / "train", run_dir / "train", summary.get("resumed_step") or 0)
        identical = not problems
    elif identical:
        identical = artifact_files(run_dir / case.stage) == artifact_files(reference / case.stage)
    if not identical:
        print(f"{name} point {index}: differs (leftovers: {leftovers(run_dir)})", file=sys.stderr)
    else:
        shutil.rmtree(run_dir)
    return {"tried": True, "completed": completed, "identical": identical, "no_orphans": not alive}


INIT: Dict[str, Path] = {}


def overrides(case: Case, run_dir: Path) -> List[str]:
    corpus = INIT["corpus"]
    return fast_overrides(corpus, run_dir, *(o.format(init=INIT["init"]) for o in case.overrides))


def run_cases(names: List[str], points: int, seed: int, work: Path) -> Dict[str, Dict[str, int]]:
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    import gzip

    for s in SOURCES:
        with gzip.open(SAMPLE / f"{s}.jsonl.gz", "rb") as f, open(corpus / f"{s}.jsonl", "wb") as g:
            shutil.copyfileobj(f, g)
    INIT.update(corpus=corpus, init=tiny_hf_init(work / "init"))
    rng = random.Random(seed)
    table = {}
    for name in names:
        case = CASES[name]
        upstream = work / f"{name}-upstream"
        if case.upstream:
            run_ok("run", *overrides(case, upstream), "--only", ",".join(case.upstream))
        else:
            upstream.mkdir()
        reference = work / f"{name}-reference"
        shutil.copytree(upstream, reference, symlinks=True)
        duration = run_ok("run", *overrides(case, reference), "--only", case.stage)
        rows = [kill_and_rerun(name, case, upstream, reference, duration, rng, work, i) for i in range(points)]
        table[name] = {k: sum(r[k] for r in rows) for k in ("tried", "completed", "identical", "no_orphans")}
        table[name]["seconds"] = round(duration, 1)
    return table


def print_table(table: Dict[str, Dict[str, int]]) -> None:
    print(f"{'stage':<16} {'T (s)':>6} {'kills':>6} {'completed':>10} {'identical':>10} {'no orphans':>11}")
    for name, row in table.items():
        print(f"{name:<16} {row['seconds']:>6} {row['tried']:>6} {row['completed']:>10} {row['identical']:>10} "
              f"{row['no_orphans']:>11}")


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--points", type=int, default=20, help="kill points per stage")
    p.add_argument("--stages", default=",".join(CASES), help=f"comma separated, of: {', '.join(CASES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="where the runs go (default: a temp dir, removed when all pass)")
    a = p.parse_args(argv)
    names = a.stages.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"unknown stages {unknown}; known: {', '.join(CASES)}")
    work = a.work or Path(tempfile.mkdtemp(prefix="kill_points-"))
    table = run_cases(names, a.points, a.seed, work)
    print_table(table)
    ok = all(r["completed"] == r["identical"] == r["no_orphans"] == r["tried"] for r in table.values())
    if ok and not a.work:
        shutil.rmtree(work)
    elif not ok:
        print(f"runs that differ are kept in {work}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
