"""The stage runner: fingerprints, manifests, skip/resume, one writer per run dir.

A stage is a name, its upstream stages, the config keys it reads and a `run(ctx)`. Its identity
(fingerprint) is the sha256 of: those keys' resolved values, the upstream fingerprints, the stage's
code version, and the content of any input outside the run dir. The fingerprint is computed from the
config alone, so the whole plan is known before anything runs.

On disk, under the run dir:
    <stage>/             published output; MANIFEST.json inside, written last (tmp + rename)
    <stage>.partial/     work in progress; never read downstream. Resumed when its .fingerprint
                         matches and the stage is resumable. Otherwise cleared, unless it holds costly
                         work (checkpoints, finished shards): then the run stops and names what changed
    <stage>.restarted-<time>/  a partial moved aside by `pipeline run --restart <stage>`; kept until
                         `pipeline clean`
    .lock                {pid, host, since, stage} of the one process writing this run dir (RunLock)
    config.yaml          the fully resolved config of the last run (`pipeline run --config-from <run dir>`)
    environment.json     what ran it: package versions, the git commit (and whether it was dirty), seeds
An earlier output stays in place, untouched, until its replacement is complete. Inside a stage's dir,
the names that other stages, commands and tools look for are the layout constants below (JOB_FILE,
CHECKPOINTS, HF_MODEL, ...): named here once, asked for everywhere else.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from pipeline import integrity
from pipeline.config import run_dir_of, strip_added_defaults, strip_how, subtree
from pipeline.errors import StageError
from pipeline.files import (
    canonical_json,
    dir_bytes,
    read_json,
    replace_dir,
    sha256_file,
    storage_errors,
    write_json_atomic,
)
from pipeline.lock import RunLock, lock_state

log = logging.getLogger("pipeline")

MANIFEST = "MANIFEST.json"
FINGERPRINT = ".fingerprint"  # in a partial dir: the fingerprint its work is for
IDENTITY = ".identity.json"  # in a partial dir: what its fingerprint hashed, so a change can be named
ASIDE = ".restarted-"  # <stage>.restarted-<time>: a partial moved aside by --restart
SCRATCH = "_scratch"  # inside a work dir: resumable state the stage keeps, dropped before publishing
# ----------------------------------------------------------------------------- the run-dir layout
# Inside a stage's dir (or its partial): what more than one module reads or writes.
JOB_FILE = "job.json"  # train: the TrainJob every rank reads (pipeline/train/job.py)
CHECKPOINTS = "checkpoints"  # train: the backend's checkpoints (layout: pipeline/formats/checkpoints.py)
HF_MODEL = "hf"  # train (hf backend), export: an HF model dir, tokenizer files included
MEGATRON_MODEL = "megatron"  # import, export: a Megatron checkpoint
STEP_LOG = "train_log.jsonl"  # train: one JSON line per logged step, rank 0, appended across resumes
SUMMARY = "train_summary.json"  # train: the run's final metrics
SAMPLES = "samples.jsonl"  # train: text the model generated at each evaluation, one JSON line per prompt
LAUNCHER_LOGS = "launcher_logs"  # train: torchrun's per-rank logs, node<N>/ each
SWANLOG = "swanlog"  # train: swanlab's local-mode logs (`swanlab watch`)


def train_log(work_dir: Path, node: int = 0) -> Path:
    """A launch's output: node 0's (the driver's) train.log, node N's train_node<N>.log beside it."""
    return work_dir / ("train.log" if node == 0 else f"train_node{node}.log")


def launcher_log_dir(work_dir: Path, node: int) -> Path:
    return work_dir / LAUNCHER_LOGS / f"node{node}"


HASH_LIMIT = 64 * 1024 * 1024  # files above this are identified by size+mtime (inputs) or size (outputs)
HASH_TOTAL_LIMIT = 1 << 30  # a stage whose inputs add up to more is identified by size+mtime throughout,
# so a skip check on a 100 GB corpus does not read 100 GB


@dataclass(frozen=True)
class Stage:
    name: str
    needs: Tuple[str, ...]  # upstream stages whose published outputs this one reads
    reads: Tuple[str, ...]  # config keys (dotted) this stage sees; nothing else is visible to it
    run: Callable[["StageContext"], Dict[str, Any]]  # does the work, returns metrics for the manifest
    version: str = "1"  # bump when a code change changes the output for the same config
    external_inputs: Optional[Callable[[DictConfig], List[str]]] = None  # files outside the run dir
    resumable: bool = False  # a partial work dir with the same fingerprint is kept for run() to resume
    # resumable stages: the files in a partial dir that hold costly work (complete checkpoints, finished
    # shards); a partial holding any is never removed without --restart
    holds_work: Optional[Callable[[Path], List[str]]] = None
    # checks that need only the config and the machine; run for every planned stage before any starts
    check: Optional[Callable[[DictConfig], None]] = None
    # output globs that programs users point at them rewrite (tracker logs, logs, summaries): listed in the
    # manifest but not pinned, so opening a dashboard never makes a stage stale
    unpinned: Tuple[str, ...] = ()


@dataclass
class StageContext:
    cfg: DictConfig  # only the keys the stage declared in `reads`
    work_dir: Path  # write outputs here (it becomes <run_dir>/<stage> when run() returns)
    inputs: Dict[str, Path]  # upstream stage name -> its published directory
    run_dir: Path
    fingerprint: str = ""  # this stage's
    upstream: Dict[str, str] = field(default_factory=dict)  # upstream stage name -> its fingerprint

    @property
    def scratch(self) -> Path:
        path = self.work_dir / SCRATCH
        path.mkdir(parents=True, exist_ok=True)
        return path


# ----------------------------------------------------------------------------- hashing helpers

def input_identity(path: Path, hash_content: bool = True) -> Dict[str, Any]:
    """Content hash of an input file, or size+mtime when hashing it on every plan would be too slow."""
    st = path.stat()
    if not hash_content or st.st_size > HASH_LIMIT:
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "how": "size+mtime (large input)"}
    return {"sha256": sha256_file(path)}


def input_identities(paths: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """Identities of a set of inputs: content hashes while they total <= 1 GiB, size+mtime beyond."""
    hash_content = sum(os.path.getsize(p) for p in paths) <= HASH_TOTAL_LIMIT
    return {p: input_identity(Path(p), hash_content) for p in paths}


def flatten(obj: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: Dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def package_versions() -> Dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in ("pipeline", "numpy", "tokenizers", "transformers", "datasets", "torch", "megatron-core",
                 "deepspeed", "hydra-core", "swanlab", "fastokens", "gigatoken"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_state() -> Optional[Dict[str, Any]]:
    """The commit of the code that runs, and whether the checkout has uncommitted changes; None when
    the package is not a git checkout."""

    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def environment(cfg: DictConfig) -> Dict[str, Any]:
    return {"packages": package_versions(), "git": git_state(), "host": socket.gethostname(), "argv": sys.argv,
            "seeds": {key: OmegaConf.select(cfg, key) for key in ("data.mix.seed", "train.seed")},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


# ----------------------------------------------------------------------------- planning

@dataclass
class PlanItem:
    stage: Stage
    fingerprint: str
    parts: Dict[str, Any]  # what the fingerprint hashes, kept in the manifest for --explain
    how: Dict[str, Any] = field(default_factory=dict)  # the how-only values it sees, outside the fingerprint
    action: str = "skip"  # skip | run
    reasons: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # how-only changes: they do not rerun or restart it


class Runner:
    def __init__(self, cfg: DictConfig, stages: Sequence[Stage]):
        self.cfg = cfg
        self.stages = {s.name: s for s in stages}
        self.order = [s.name for s in stages]  # stages are listed upstream first
        self.run_dir = run_dir_of(cfg).resolve()
        self._identity_cache: Dict[Tuple[str, ...], Dict[str, Dict[str, Any]]] = {}
        for s in stages:
            for up in s.needs:
                if self.order.index(up) > self.order.index(s.name):
                    raise StageError(f"stage {s.name} is listed before its upstream {up}")

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def fingerprint(self, stage: Stage, upstream: Dict[str, str]) -> Tuple[str, Dict[str, Any], Dict[str, Any]]:
        """(fingerprint, the parts it hashes, the how-only values left out of it)."""
        config = {key: subtree(self.cfg, key) for key in stage.reads}
        how = strip_how(config)  # launcher, trackers, logging, workers, layout: see pipeline/config.py
        strip_added_defaults(config)  # keys added later, at the default that reproduces older runs
        inputs = {}
        if stage.external_inputs:
            paths = tuple(stage.external_inputs(self.cfg))
            if paths not in self._identity_cache:  # stages often share their inputs
                self._identity_cache[paths] = input_identities(paths)
            inputs = self._identity_cache[paths]
        parts = {"code": stage.version, "config": config,
                 "upstream": {u: upstream[u] for u in stage.needs}, "inputs": inputs}
        return hashlib.sha256(canonical_json(parts).encode()).hexdigest(), parts, how

    def manifest(self, name: str) -> Optional[Dict[str, Any]]:
        return read_json(self.stage_dir(name) / MANIFEST)

    def pinned_outputs(self, name: str, manifest: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
        """The outputs a manifest records that the stage still pins (older manifests may list unpinned ones)."""
        return {rel: ident for rel, ident in manifest.get("outputs", {}).items()
                if not _unpinned(self.stages[name], rel)}

    def missing_outputs(self, name: str, manifest: Dict[str, Any]) -> List[str]:
        """The pinned outputs missing or not at their recorded size (a skip hashes nothing: deadline 0)."""
        stage_dir = self.stage_dir(name)
        changed = integrity.verify_outputs(stage_dir, self.pinned_outputs(name, manifest), deadline=0.0).changed
        return [str(Path(path).relative_to(stage_dir)) for path, _ in changed]

    def verify_upstream(self, item: PlanItem) -> None:
        """Before `item` runs: the outputs of the stages it reads are what they wrote (sizes, and sha256 within
        integrity.HASH_SECONDS), or a StageError naming the file and the stage that rebuilds it."""
        deadline = time.monotonic() + integrity.HASH_SECONDS
        for up in item.stage.needs:
            started = time.monotonic()
            result = integrity.verify_outputs(self.stage_dir(up), self.pinned_outputs(up, self.manifest(up) or {}),
                                              deadline)
            if result.changed:
                raise StageError(f"stage {item.stage.name} reads {up}: "
                                 + integrity.changed_message(result.changed, up))
            if not result.files:
                continue
            budget = (f"; {result.unhashed} left at their size: the {integrity.HASH_SECONDS:g} s hashing budget was "
                      f"spent (`pipeline status --verify` hashes all)" if result.unhashed else "")
            log.info("[%s] upstream %s unchanged: %d files at their recorded size, sha256 of %d (%.1f MB) in %.1fs%s",
                     item.stage.name, up, result.files, result.hashed, result.hashed_bytes / 1e6,
                     time.monotonic() - started, budget)

    def plan(self, only: Optional[Sequence[str]] = None, force: Sequence[str] = ()) -> List[PlanItem]:
        for name in list(only or []) + list(force):
            if name not in self.stages:
                raise StageError(f"unknown stage '{name}'; stages are: {', '.join(self.order)}")
        fps: Dict[str, str] = {}
        items: Dict[str, PlanItem] = {}
        for name in self.order:
            stage = self.stages[name]
            fp, parts, how = self.fingerprint(stage, fps)
            fps[name] = fp
            item = PlanItem(stage, fp, parts, how)
            items[name] = item
            man = self.manifest(name)
            if name in force:
                item.reasons.append("forced (--force)")
            if man is None:
                item.reasons.append("never completed (no MANIFEST.json)")
                partial = read_json(self.partial_dir(name) / IDENTITY)
                if partial and partial.get("fingerprint") == fp and stage.resumable:
                    item.reasons.append(f"resumes the partial work in {self.partial_dir(name).name}/")
                    item.notes = explain_how(partial.get("how", {}), how)
            elif man.get("fingerprint") != fp and not _same_identity(man.get("fingerprint_parts", {}), parts):
                item.reasons.extend(explain_change(man.get("fingerprint_parts", {}), parts))
            elif missing := self.missing_outputs(name, man):
                item.reasons.append(f"outputs missing or changed size: {', '.join(missing[:5])}")
            elif man.get("fingerprint") != fp:  # kept; run() rewrites its manifest under the new fingerprint
                item.notes = ["identity unchanged: the manifest predates the how-only marking of some keys"]
            else:
                item.notes = explain_how(man.get("how", {}), how)
            if item.reasons:
                item.action = "run"
        selected = list(only) if only else self.order
        for name in self.order:
            if name not in selected:
                items[name].action = "skip"
                items[name].reasons = ["not selected (--only)"] + items[name].reasons
        return [items[n] for n in self.order]

    # ------------------------------------------------------------------------- running

    def partial_dir(self, name: str) -> Path:
        return self.run_dir / f"{name}.partial"

    def check(self, plan: Sequence[PlanItem], restart: Sequence[str] = ()) -> None:
        """Before anything runs (and under --dry-run): each planned stage's config checks, and no partial
        that holds costly work is in the way of a stage whose identity changed (unless it is restarted)."""
        for item in plan:
            if item.action == "run" and item.stage.check:
                item.stage.check(self.cfg)
        for item in plan:
            if item.action == "run" and item.stage.name not in restart:
                self._refuse_to_drop(item)
            final = self.stage_dir(item.stage.name)  # publishing replaces it: only if the runner wrote it
            if item.action == "run" and os.path.lexists(final) and not (final / MANIFEST).is_file():
                raise StageError(f"stage {item.stage.name}: {final} exists but has no {MANIFEST}, so this pipeline "
                                 f"did not write it; nothing was removed. Move it away or choose another run_dir")

    def _refuse_to_drop(self, item: PlanItem) -> None:
        stage, partial = item.stage, self.partial_dir(item.stage.name)
        if not (stage.resumable and stage.holds_work and partial.is_dir()):
            return
        recorded = read_json(partial / IDENTITY) or {}
        if recorded.get("fingerprint") == item.fingerprint or _read_text(partial / FINGERPRINT) == item.fingerprint:
            return  # it resumes
        work = stage.holds_work(partial)
        if not work:
            return
        changes = (explain_change(recorded["parts"], item.parts) if "parts" in recorded
                   else ["fingerprint changed (this partial predates the record of its config)"])
        shown = ", ".join(work[:3]) + (f" and {len(work) - 3} more" if len(work) > 3 else "")
        raise StageError(
            f"stage {stage.name}: {partial} holds costly work ({shown}) made for another identity:\n"
            + "".join(f"    {c}\n" for c in changes)
            + f"Nothing was removed. Either put the old values back to resume it, or start over with "
              f"`pipeline run --restart {stage.name}` (the partial is moved aside to "
              f"{stage.name}{ASIDE}<time>/ and kept until `pipeline clean`)")

    def restart(self, names: Sequence[str]) -> List[Path]:
        """--restart: move these stages' partial dirs aside (never delete them); they then start over."""
        moved = []
        for name in names:
            if name not in self.stages:
                raise StageError(f"unknown stage '{name}'; stages are: {', '.join(self.order)}")
            partial = self.partial_dir(name)
            if partial.is_dir():
                stamp = time.strftime('%Y%m%d-%H%M%S')
                aside, n = self.run_dir / f"{name}{ASIDE}{stamp}", 1
                while aside.exists():  # two restarts within a second
                    aside, n = self.run_dir / f"{name}{ASIDE}{stamp}-{n}", n + 1
                os.replace(partial, aside)
                log.info("[%s] --restart: moved %s aside to %s", name, partial.name, aside.name)
                moved.append(aside)
        return moved

    def leftovers(self) -> List[Path]:
        """Partials moved aside by --restart, oldest first; `pipeline clean` removes them on request."""
        return sorted(p for p in self.run_dir.glob(f"*{ASIDE}*") if p.is_dir())

    def run(self, only: Optional[Sequence[str]] = None, force: Sequence[str] = (),
            restart: Sequence[str] = (), break_lock: bool = False) -> List[PlanItem]:
        with RunLock(self.run_dir, break_lock) as lock:
            force = list(force) + [n for n in restart if n not in force]
            plan = self.plan(only, force)
            self.check(plan, restart)  # before any stage runs or any partial is moved
            if restart:
                self.restart(restart)
                plan = self.plan(only, force)
            OmegaConf.save(self.cfg, self.run_dir / "config.yaml")
            write_json_atomic(self.run_dir / "environment.json", environment(self.cfg))
            for item in plan:
                name = item.stage.name
                if item.action == "skip":
                    log.info("[%s] skip: %s", name, "done" if not item.reasons else item.reasons[0])
                    man = self.manifest(name)
                    if not item.reasons and man and man["fingerprint"] != item.fingerprint:
                        write_json_atomic(self.stage_dir(name) / MANIFEST, {
                            **man, "fingerprint": item.fingerprint, "fingerprint_parts": item.parts, "how": item.how})
                    continue
                for up in item.stage.needs:
                    man = self.manifest(up)
                    if man is None or man.get("fingerprint") != item.parts["upstream"][up]:
                        raise StageError(
                            f"stage {name} needs {up}, which is not complete for this config; "
                            f"run it first (drop --only, or add it: --only {up},{name})")
                log.info("[%s] run: %s", name, "; ".join(item.reasons))
                for note in item.notes:
                    log.info("[%s] %s", name, note)
                self.verify_upstream(item)  # what it reads is what its upstream stages wrote: sizes, sha256
                self._execute(item, lock)
            return plan

    def _execute(self, item: PlanItem, lock: Optional[RunLock] = None) -> None:
        stage, name = item.stage, item.stage.name
        partial = self.partial_dir(name)
        if partial.exists():
            resumable = stage.resumable and _read_text(partial / FINGERPRINT) == item.fingerprint
            if resumable:
                log.info("[%s] resuming partial work in %s", name, partial)
            else:
                self._refuse_to_drop(item)  # checked before the run too; the partial may have changed since
                shutil.rmtree(partial)
        if lock is not None:
            lock.working_on(name)
        try:
            with storage_errors(partial):
                self._work(item, partial)
        except BaseException:
            self._failed(stage, partial)
            raise

    def _failed(self, stage: Stage, partial: Path) -> None:
        """A failed stage's partial dir goes, unless the stage resumes from it: then only its unfinished writes
        (*.tmp, which nothing resumes from) go, and the rest stays for the rerun."""
        if not stage.resumable:
            shutil.rmtree(partial, ignore_errors=True)
            log.info("[%s] failed; removed %s (a rerun starts the stage over)", stage.name, partial.name)
            return
        for tmp in partial.rglob("*.tmp"):
            tmp.unlink(missing_ok=True)
        log.info("[%s] failed; %s is kept for the rerun to resume", stage.name, partial.name)

    def _work(self, item: PlanItem, partial: Path) -> None:
        stage, name = item.stage, item.stage.name
        final, marker = self.stage_dir(name), partial / FINGERPRINT
        partial.mkdir(parents=True, exist_ok=True)
        marker.write_text(item.fingerprint)
        write_json_atomic(partial / IDENTITY, {"fingerprint": item.fingerprint, "parts": item.parts, "how": item.how})
        ctx = StageContext(
            cfg=_restrict(self.cfg, stage.reads),
            work_dir=partial,
            inputs={up: self.stage_dir(up) for up in stage.needs},
            run_dir=self.run_dir,
            fingerprint=item.fingerprint,
            upstream=item.parts["upstream"],
        )
        started = time.time()
        metrics = stage.run(ctx) or {}
        shutil.rmtree(partial / SCRATCH, ignore_errors=True)
        marker.unlink()
        (partial / IDENTITY).unlink()
        outputs = _describe_outputs(partial)
        manifest = {
            "stage": name,
            "fingerprint": item.fingerprint,
            "fingerprint_parts": item.parts,
            "how": item.how,  # not hashed; `--explain` names how-only changes from it
            "status": "complete",
            "outputs": {rel: o for rel, o in outputs.items() if not _unpinned(stage, rel)},
            "unpinned": {rel: o["size"] for rel, o in outputs.items() if _unpinned(stage, rel)},
            "metrics": metrics,
            "started": started,
            "finished": time.time(),
            "seconds": round(time.time() - started, 3),
            "versions": package_versions(),
        }
        write_json_atomic(partial / MANIFEST, manifest)
        replace_dir(partial, final)
        log.info("[%s] done in %.1fs", name, manifest["seconds"])

    # ------------------------------------------------------------------------- status

    def status(self) -> List[Dict[str, Any]]:
        rows = []
        holder, _, stale = lock_state(self.run_dir / ".lock")
        running = holder.get("stage") if holder and stale is None else None  # what a live lock holder works on
        for item in self.plan():
            name = item.stage.name
            man = self.manifest(name) or {}
            if name == running and self.partial_dir(name).exists():
                state = "running"
            elif not man:
                state = "partial" if self.partial_dir(name).exists() else "missing"
            elif item.action == "run":
                state = "stale"
            else:
                state = "done"
            outputs = man.get("outputs", {})
            rows.append({
                "stage": name,
                "status": state,
                "fingerprint": item.fingerprint,
                "manifest_fingerprint": man.get("fingerprint"),
                "reasons": item.reasons,
                "dir": str(self.stage_dir(name)),
                "outputs": {rel: str(self.stage_dir(name) / rel) for rel in outputs},
                "bytes": sum(o["size"] for o in outputs.values()),
                "seconds": man.get("seconds"),
                "finished": man.get("finished"),
                "holder": f"{holder['pid']}@{holder['host']}" if state == "running" else None,
                "metrics": man.get("metrics", {}),
            })
        for aside in self.leftovers():
            rows.append({"stage": aside.name.split(ASIDE)[0], "status": "aside", "fingerprint": "",
                         "manifest_fingerprint": None,
                         "reasons": ["moved aside by --restart; `pipeline clean` removes it"],
                         "dir": str(aside), "outputs": {}, "bytes": dir_bytes(aside), "seconds": None,
                         "finished": aside.stat().st_mtime, "holder": None, "metrics": {}})
        return rows


def _same_identity(before: Dict[str, Any], after: Dict[str, Any]) -> bool:
    """A manifest written before some keys were marked how-only hashed them too: once they are taken out,
    is it the identity we have now? Then its (possibly days of) output is still this config's."""
    config = json.loads(json.dumps(before.get("config", {})))
    strip_how(config)
    return bool(before) and {**before, "config": config} == after


def _read_text(path: Path) -> Optional[str]:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _unpinned(stage: Stage, rel: str) -> bool:
    return any(fnmatch.fnmatch(rel, pattern) for pattern in stage.unpinned)  # `*` matches across `/` too


def _restrict(cfg: DictConfig, keys: Sequence[str]) -> DictConfig:
    """A copy of cfg holding only `keys`: a stage cannot read what its fingerprint does not cover."""
    out = OmegaConf.create({})
    for key in keys:
        OmegaConf.update(out, key, OmegaConf.select(cfg, key), force_add=True)
    OmegaConf.set_readonly(out, True)
    OmegaConf.set_struct(out, True)
    return out


def _describe_outputs(directory: Path) -> Dict[str, Dict[str, Any]]:
    outputs = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = str(path.relative_to(directory))
        if rel in (FINGERPRINT, IDENTITY):
            continue
        size = path.stat().st_size
        outputs[rel] = {"size": size, "sha256": sha256_file(path)} if size <= HASH_LIMIT else {"size": size}
    return outputs


def explain_how(before: Dict[str, Any], after: Dict[str, Any]) -> List[str]:
    """Name the how-only values that differ from the last run's: they change nothing it computes."""
    old, new = flatten(before), flatten(after)
    return [f"how only (resumes, reruns nothing): {key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}"
            for key in sorted(set(old) | set(new)) if old.get(key, "<unset>") != new.get(key, "<unset>")]


def explain_change(before: Dict[str, Any], after: Dict[str, Any]) -> List[str]:
    """Name what differs between two fingerprints' parts: config keys, upstream stages, inputs, code."""
    reasons = []
    if before.get("code") != after.get("code"):
        reasons.append(f"code version {before.get('code')} -> {after.get('code')}")
    old, new = flatten(before.get("config", {})), flatten(after.get("config", {}))
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            reasons.append(f"config {key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}")
    for up in sorted(set(before.get("upstream", {})) | set(after.get("upstream", {}))):
        if before.get("upstream", {}).get(up) != after.get("upstream", {}).get(up):
            reasons.append(f"upstream stage {up} changed")
    for path in sorted(set(before.get("inputs", {})) | set(after.get("inputs", {}))):
        if before.get("inputs", {}).get(path) != after.get("inputs", {}).get(path):
            reasons.append(f"input {path} changed")
    return reasons or ["fingerprint changed"]
