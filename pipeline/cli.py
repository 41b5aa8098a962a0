"""`pipeline run | status | clean | experiments | convert | verify | eval | generate | verify-data | preprocess`.
Overrides are Hydra's: `pipeline run data.mix.weights.code=0.2`; `pipeline run -m train.lr=1e-3,3e-4` sweeps."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, List, NamedTuple, Optional, Tuple

from pipeline import integrity
from pipeline.errors import ConfigError, ConversionError, PipelineError
from pipeline.files import STORAGE_ERRORS, storage_errors, storage_problem
from pipeline.runner import Runner

log = logging.getLogger("pipeline")


def _stages(value: Optional[str]) -> List[str]:
    return [s for s in (value or "").split(",") if s]


def _config_dirs(args) -> List[Path]:
    return [Path(d) for d in getattr(args, "config_dir", None) or []]


def _config(args, overrides: List[str]):
    from pipeline.config import compose

    if getattr(args, "config_from", None):
        return config_from(Path(args.config_from), overrides)
    return compose(overrides, _config_dirs(args))


def _runner(args, cfg=None) -> Runner:
    from pipeline.stages import STAGES

    return Runner(cfg if cfg is not None else _config(args, args.overrides), STAGES)


SWEPT_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+~-]")  # a path separator, a space, a quote, ...


def override_dirname(lines: List[str]) -> str:
    """A job's run-dir name, as Hydra's `hydra.job.override_dirname`: its swept `key=value`s joined by `,` in
    key order. Made filesystem-safe: other characters become `_`, and a name so changed (or over 200
    characters) ends in a hash of the real one, so two jobs never share a dir."""
    name = ",".join(lines)
    safe = SWEPT_NAME_UNSAFE.sub("_", name)
    if safe != name or len(safe) > 200:
        safe = f"{safe[:200]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return safe


def sweep_jobs(overrides: List[str]) -> List[Tuple[List[str], str]]:
    """(a job's overrides, its run-dir name) for each job of a multirun: Hydra's BasicSweeper, the cartesian
    product of the sweeps (`a,b`, `range(1,4)`, `choice(a,b)`), first override slowest."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    # BasicSweeper keeps one entry per key, at its first place, with its last value
    swept = {o.get_key_element(): o.is_sweep_override() for o in parsed}
    jobs = []
    for job in BasicSweeper.split_arguments(parsed, None)[0]:
        lines = [line for (key, sweep), line in sorted(zip(swept.items(), job)) if sweep]
        jobs.append((job, override_dirname(lines)))
    return jobs


CONFIG_GROUPS = ("experiment", "data", "tokenizer", "model", "train", "launcher")  # configs/<group>/


def config_from(run_dir: Path, overrides: List[str]):
    """An earlier run's resolved config (its config.yaml), with `key=value` overrides on top (say
    run_dir=runs/again to rerun it elsewhere). Warns when the code is not the commit that ran it."""
    from omegaconf import OmegaConf

    from pipeline.config import load_saved, validate
    from pipeline.files import read_json
    from pipeline.runner import git_state

    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--config-from: {saved} does not exist; give a run dir that has run (runs/<name>)")
    for o in overrides:
        if "=" not in o or o.split("=", 1)[0] in CONFIG_GROUPS:
            raise ConfigError(f"{o}: with --config-from only key=value overrides apply (e.g. train.lr=1e-4), "
                              f"not config-group choices")
    cfg = OmegaConf.merge(load_saved(saved), OmegaConf.from_dotlist(list(overrides)))
    validate(cfg)
    recorded = ((read_json(run_dir / "environment.json") or {}).get("git") or {}).get("commit")
    current = (git_state() or {}).get("commit")
    if recorded and current and recorded != current:
        log.warning("--config-from: %s ran at commit %s; this code is %s", run_dir, recorded[:12], current[:12])
    return cfg


def cmd_run(args) -> int:
    """One run; with -m, one per job of the sweep, in turn, each in <run_dir>/<its swept overrides>. Every
    job is composed (and so checked) before the first starts."""
    from pipeline.config import run_dir_of

    if args.config_from and (args.multirun or args.info or args.cfg in ("hydra", "all")):
        raise ConfigError("--config-from: a saved config has no sweep, search path or Hydra node; drop "
                          "-m/--info/--cfg hydra, or compose it anew without --config-from")
    jobs = []
    for overrides, subdir in sweep_jobs(args.overrides) if args.multirun else [(args.overrides, "")]:
        cfg = _config(args, overrides)
        if subdir:
            cfg.run_dir = str(run_dir_of(cfg) / subdir)
        jobs.append((overrides, subdir, cfg))
    for i, (overrides, subdir, cfg) in enumerate(jobs, 1):
        if args.multirun:
            print(f"{'#' if args.cfg else ''}job {i}/{len(jobs)}: {subdir or '(nothing swept)'} -> "
                  f"{run_dir_of(cfg)}", flush=True)
        if args.cfg or args.info:
            show_config(args, overrides, cfg)
            continue
        rc = run_one(args, _runner(args, cfg))
        if rc:  # a joining node's torchrun agent failed
            return rc
    return 0


def show_config(args, overrides: List[str], cfg) -> None:
    """--cfg job|hydra|all: the composed config (job: resolved, as it runs; hydra: Hydra's node, unresolved);
    --info: the config search path and the defaults list, in merge order."""
    from omegaconf import OmegaConf

    from pipeline.config import defaults_list, hydra_config

    if args.cfg in ("job", "all"):
        print(OmegaConf.to_yaml(cfg), end="")
    if args.cfg in ("hydra", "all") or args.info:
        node = hydra_config(overrides, _config_dirs(args))
    if args.cfg in ("hydra", "all"):
        print(OmegaConf.to_yaml(OmegaConf.create({"hydra": node})), end="")
    if args.info:
        print("config search path (first match wins):")
        for source in node.runtime.config_sources:
            print(f"  {source.provider:<34} {source.schema}://{source.path}")
        print("defaults list (merge order; hydra's own left out):")
        for path, package, parent in defaults_list(overrides, _config_dirs(args)):
            print(f"  {path:<34} package {package:<10} from {parent}")


def run_one(args, runner: Runner) -> int:
    from pipeline import launch, plan
    from pipeline.train.stage import join_training

    only, restart = _stages(args.only), _stages(args.restart)
    force = _stages(args.force) if args.force != "*" else (only or list(runner.stages))
    if args.dry_run or args.explain:
        items = runner.plan(only, force + restart)
        for item in items:
            print(f"{item.stage.name:<10} {item.action:<5} {item.fingerprint[:12]}")
            if args.explain:
                for reason in item.reasons or ["up to date: same fingerprint, outputs present"]:
                    print(f"    {reason}")
                for note in item.notes:
                    print(f"    {note}")
        lines, warnings = plan.training_plan(runner.cfg)
        print("\n".join(["", *lines, *(f"WARNING    {w}" for w in warnings)]))
        runner.check(items, restart)  # the checks a run makes before its first stage
        return 0
    if launch.is_joining_node(runner.cfg.launcher):
        return join_training(runner, runner.cfg.launcher)
    with storage_errors(runner.run_dir):  # what no stage wrote: the lock, config.yaml, environment.json
        try:
            runner.run(only, force, restart, args.break_lock)
        except KeyboardInterrupt as e:  # the train stage has stopped its ranks (pipeline/train/stage.py)
            print(("\n" if sys.stderr.isatty() else "") + interrupted_line(getattr(e, "checkpoint", None)),
                  file=sys.stderr, flush=True)
            return 130
    print("\n".join(end_of_run(runner.run_dir)), flush=True)
    return 0


def interrupted_line(checkpoint: Optional[Path]) -> str:
    import shlex

    return (f"interrupted; last complete checkpoint: {checkpoint or 'none'}; resume with: pipeline "
            f"{shlex.join(sys.argv[1:])}")


def end_of_run(run_dir: Path) -> List[str]:
    """The summary (pipeline/report.py), which also writes report.md; a report that cannot be written
    leaves the finished run as it is."""
    from pipeline import report

    try:
        return report.write(run_dir)
    except Exception as e:  # the stages are published: a missing plotting library must not fail them
        log.warning("report: %s not written (%s: %s)", run_dir / report.REPORT, type(e).__name__, e)
        return [f"run dir: {run_dir}"]


def run_dir_line(runner: Runner) -> str:
    """Which run dir a status reads; one that does not exist says how to point at the right one."""
    if runner.run_dir.is_dir():
        return f"run dir: {runner.run_dir}"
    return (f"run dir: {runner.run_dir} does not exist, so every stage is missing; give the overrides the run "
            f"had (run_dir=..., experiment=...) or run this where it ran")


def cmd_status(args) -> int:
    runner = _runner(args)
    if args.json:  # stdout stays one JSON document
        print(run_dir_line(runner), file=sys.stderr)
        print(json.dumps(runner.status(), indent=2))
        return 0
    print(run_dir_line(runner))
    if args.verify:  # every published stage against its manifest: sizes, and all the sha256s it recorded
        return verify_run(runner)
    rows = runner.status()
    print(f"{'stage':<10} {'status':<8} {'fingerprint':<13} {'size':>10} {'seconds':>8}  finished")
    for r in rows:
        finished = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["finished"])) if r["finished"] else "-"
        size = f"{r['bytes'] / 1e6:.1f} MB" if r["bytes"] else "-"
        where = f"  {Path(r['dir']).name}/" if r["status"] == "aside" else f"  {r['holder']}" if r["holder"] else ""
        print(f"{r['stage']:<10} {r['status']:<8} {r['fingerprint'][:12]:<13} {size:>10} "
              f"{r['seconds'] if r['seconds'] is not None else '-':>8}  {finished}{where}")
        if r["status"] in ("stale", "partial"):
            for reason in r["reasons"]:
                print(f"{'':<10} {r['status']}: {reason}")
        shown = metric_text(r["stage"], r.get("metrics") or {})
        if shown:
            print(f"{'':<10} {shown}")
    return 0


# the metrics `pipeline status` shows per stage (dotted: inside a nested metric), from its manifest
STATUS_METRICS = {
    "tokenizer": ("vocab_len",),
    "tokenize": ("tokens", "tokens_per_second"),
    "mix": ("train.tokens", "valid.tokens"),
    "train": ("steps", "tokens_seen", "final_loss", "eval_loss", "tokens_per_second", "mfu"),
}


def metric_text(stage: str, metrics: dict) -> str:
    parts = []
    for key in STATUS_METRICS.get(stage, ()):
        value: Any = metrics
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{key} {value:,}" if isinstance(value, int) else f"{key} {value:.4g}")
    return "  ".join(parts)


def cmd_clean(args) -> int:
    """Remove the partial dirs that --restart moved aside, on request: without --yes, only list them."""
    import shutil

    runner = _runner(args)
    leftovers = runner.leftovers()
    if not leftovers:
        print(f"nothing to clean in {runner.run_dir}")
    for path in leftovers:
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
        if args.yes:
            shutil.rmtree(path)
        print(f"{'removed' if args.yes else 'would remove'} {path} ({size / 1e6:.1f} MB)")
    if leftovers and not args.yes:
        print("run `pipeline clean --yes` (with the same run dir) to remove them")
    return 0


def cmd_experiments(args) -> int:
    """Each experiment over the search path with its description; a name found twice runs the first."""
    from pipeline.config import CONFIG_DIR, description, search_path

    first = {}
    for root in search_path(_config_dirs(args)):
        for path in sorted((root / "experiment").glob("*.yaml")):
            where = "" if root == CONFIG_DIR else f"  [{root}]"
            if path.stem in first:
                where += f"  (shadowed by {first[path.stem]}: experiment={path.stem} runs that one)"
            first.setdefault(path.stem, path)
            print(f"{path.stem:<24} {description(path)}{where}")
    return 0


def run_help() -> str:
    """`pipeline run --help`'s epilog: the config groups and their options (the project's), and where the keys are."""
    from pipeline.config import CONFIG_DIR

    groups = [f"  {g}=  {' | '.join(sorted(p.stem for p in (CONFIG_DIR / g).glob('*.yaml')))}" for g in CONFIG_GROUPS]
    return "\n".join(["config groups (group=option):", *groups,
                      "every key with its value: pipeline run --cfg job; what each means: pipeline/config.py; "
                      "experiments with descriptions: pipeline experiments"])


def cmd_preprocess(args) -> int:
    from pipeline.data.preprocess import preprocess

    preprocess(args)
    return 0


def cmd_verify_data(args) -> int:
    """Any .bin/.idx pair: its structure, and every token id (< --vocab-size if given). A bad one is a DataError."""
    from pipeline.formats.indexed import IndexedReader, check_token_ids

    prefix = args.prefix[:-4] if args.prefix.endswith((".bin", ".idx")) else args.prefix
    reader = IndexedReader(prefix)
    top, _ = check_token_ids(reader, args.vocab_size)
    vocab = f" (< vocab size {args.vocab_size})" if args.vocab_size is not None else ""
    print(f"{prefix}: OK: {len(reader):,} documents, {reader.num_tokens:,} {reader.dtype.name} tokens, "
          f"max id {top if top >= 0 else '-'}{vocab}")
    return 0


def verify_run(runner: Runner) -> int:
    """`pipeline status --verify`: every published stage against its manifest, all recorded hashes compared.
    Prints a line per stage and per changed artifact; 2 if any changed, else 0."""
    changed = 0
    for name in runner.order:
        manifest = runner.manifest(name)
        if manifest is None:
            print(f"{name:<10} not published")
            continue
        result = integrity.verify_outputs(runner.stage_dir(name), runner.pinned_outputs(name, manifest))
        if result.changed:
            print(f"{name:<10} CHANGED  {len(result.changed)} of {result.files} files")
            for path, what in result.changed:
                print(f"    {path} {what}: rebuild it with `pipeline run --force {name}`")
        else:
            print(f"{name:<10} ok       {result.files} files at their recorded size, {result.hashed} of them also "
                  f"by sha256 ({result.hashed_bytes / 1e6:.1f} MB)")
        changed += len(result.changed)
    if changed:
        print(f"error: {changed} artifact(s) changed since their stage wrote them", file=sys.stderr)
        return 2
    return 0


class Arg(NamedTuple):
    """One `key=value` argument of `pipeline convert` / `pipeline verify`: how its text is read, its default
    (as text, read the same way; None = none, REQUIRED = must be given) and what it means. The help is
    built from these tables, so a key cannot be accepted and left undocumented."""

    type: Callable[[str], Any]
    default: Optional[str]
    meaning: str


REQUIRED = "required"


def arg_type(entry) -> Callable[[str], Any]:
    return entry.type if isinstance(entry, Arg) else entry  # a bare type: accepted, shown as undocumented


def key_values(pairs: List[str], allowed: dict) -> dict:
    """`key=value` arguments (as the design's `pipeline convert src=... to=hf`), typed by `allowed`
    (key -> Arg, or a bare type), with each Arg's default filled in for keys not given."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in allowed:
            raise ConfigError(f"'{pair}': expected one of {', '.join(f'{k}=...' for k in allowed)}")
        try:
            out[key] = arg_type(allowed[key])(value)
        except ValueError as e:  # int('x'), float('2X'): the pair that did not parse, not a traceback
            raise ConfigError(f"{key}: cannot read '{value}' ({e})") from None
    for key, entry in allowed.items():
        if key not in out and isinstance(entry, Arg) and entry.default not in (None, REQUIRED):
            out[key] = entry.type(entry.default)
    return out


def args_help(table: dict) -> str:
    """The keys of a key=value command, one per line: key=<type> (default ...): meaning."""
    lines = []
    for key, entry in table.items():
        if isinstance(entry, Arg):
            default = "required" if entry.default == REQUIRED else f"default {entry.default}" \
                if entry.default is not None else "default: none"
            lines.append(f"  {key}=  ({default})  {entry.meaning}")
        else:
            lines.append(f"  {key}=  (UNDOCUMENTED: give it an Arg in pipeline/cli.py)")
    return "keys:\n" + "\n".join(lines)


def size_bytes(text: str) -> int:
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
    suffix = text[-2:].upper()
    return int(float(text[:-2]) * units[suffix]) if suffix in units else int(text)


def true_or_false(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ConfigError(f"'{text}' is not true or false (as in overwrite=true)")
    return text.lower() == "true"


CONVERT_ARGS = {
    "src": Arg(Path, REQUIRED, "the checkpoint to convert: an HF dir (config.json) or a Megatron checkpoints dir"),
    "dst": Arg(Path, REQUIRED, "the new checkpoint's dir (refused if it exists and is not empty, see overwrite)"),
    "to": Arg(str, REQUIRED, "hf | megatron: the format to write"),
    "tp": Arg(int, "1", "tensor-parallel size of a Megatron output (pads the vocab; legacy: one file per rank)"),
    "pp": Arg(int, "1", "pipeline-parallel size of a Megatron output"),
    "format": Arg(str, "torch_dist", "torch_dist (loads at any TP/PP) | torch (legacy mp_rank_* files)"),
    "dtype": Arg(str, None, "fp32 | bf16 | fp16 of the written tensors; none = the source's"),
    "tokenizer": Arg(Path, None, "a tokenizer dir whose files go into an HF output (and give its vocab size)"),
    "max_shard_size": Arg(size_bytes, "5GB", "largest safetensors file of an HF output (KB, MB, GB)"),
    "make_vocab_size_divisible_by": Arg(int, "128", "Megatron pads the embedding to a multiple of this x tp"),
    "overwrite": Arg(true_or_false, "false", "true: replace a non-empty dst (the old one goes once the new is in "
                                             "place)"),
    "vocab_size": Arg(int, None, "the true vocabulary of an HF output, cut from the padded embedding; none = "
                                 "config's, the tokenizer's or the checkpoint's"),
    "config": Arg(Path, None, "an HF dir (config.json) of the model, for an HF output of a Megatron-LM "
                              "checkpoint: its vocab_size and special token ids"),
    "transformer_impl": Arg(str, "transformer_engine", "norm names of a legacy Megatron output: "
                                                      "transformer_engine | local"),
    "verify": Arg(true_or_false, "false", "true: verify src against the complete output (pipeline verify) before "
                                          "it is published; if it fails: exit 2, dst untouched, the output kept at "
                                          "<dst>.verify-failed"),
    "tolerance": Arg(float, "1e-4", "with verify=true: largest max |logit difference| that passes"),
    "seq_len": Arg(int, "1024", "with verify=true: positions compared (capped at max_position_embeddings)"),
}


def cmd_convert(args) -> int:
    """Convert src to dst; with verify=true the output is published only once verify passes."""
    from pipeline.convert import verify
    from pipeline.convert.convert import DTYPES, hf_to_megatron, megatron_to_hf, megatron_to_megatron

    kv = key_values(args.pairs, CONVERT_ARGS)
    for key in ("src", "dst", "to"):
        if key not in kv:
            raise ConfigError(f"{key}: required (pipeline convert src=<dir> dst=<dir> to=hf|megatron)")
    if kv["to"] not in ("hf", "megatron"):
        raise ConfigError(f"to: '{kv['to']}' is not one of hf, megatron")
    if kv.get("dtype") not in (None, *DTYPES):
        raise ConfigError(f"dtype: '{kv['dtype']}' is not one of {', '.join(DTYPES)}")
    if not kv["src"].is_dir():
        raise ConfigError(f"src: {kv['src']} is not a directory")
    trainer_checkpoints = sorted(kv["src"].glob("checkpoint-*/config.json"))
    if trainer_checkpoints and not (kv["src"] / "config.json").is_file():  # the hf backend's checkpoints dir
        raise ConfigError(f"src: {kv['src']} holds HF Trainer checkpoints (the hf backend's), not a Megatron "
                          f"checkpoint: give one of them ({trainer_checkpoints[-1].parent}) or the run's "
                          f"trained model (train/hf), which are HF already")
    for key in ("tp", "pp"):
        if kv.get(key, 1) < 1:
            raise ConfigError(f"{key}: must be >= 1, got {kv[key]}")
    overwrite = kv.get("overwrite", False)  # a non-empty dst is refused without it (pipeline/destination.py)
    # src against the complete <dst>.partial, before it is published (convert.py publishing)
    check = verify.ConvertCheck(kv["src"], kv["seq_len"], kv["tolerance"]) if kv["verify"] else None
    layout = {"tp": kv.get("tp", 1), "pp": kv.get("pp", 1), "fmt": kv.get("format", "torch_dist"),
              "dtype": kv.get("dtype"), "overwrite": overwrite,
              "transformer_impl": kv.get("transformer_impl", "transformer_engine"), "check": check}
    from_hf = (kv["src"] / "config.json").is_file()
    if kv["to"] == "hf":
        result = megatron_to_hf(kv["src"], kv["dst"], kv.get("dtype"), kv.get("tokenizer"),
                                kv.get("max_shard_size", 5 << 30), overwrite, kv.get("vocab_size"), check,
                                kv.get("config"))
    elif from_hf:
        result = hf_to_megatron(kv["src"], kv["dst"], make_vocab_size_divisible_by=kv.get(
            "make_vocab_size_divisible_by", 128), **layout)
    else:  # Megatron -> Megatron at another TP/PP or format
        result = megatron_to_megatron(kv["src"], kv["dst"], **layout)
    log.info("converted %s -> %s: %s", kv["src"], kv["dst"], result)
    if check:
        report = json.loads((kv["dst"] / verify.REPORT).read_text())
        log.info("%s; report: %s", verify.summary(report), kv["dst"] / verify.REPORT)
    return 0


VERIFY_ARGS = {
    "a": Arg(Path, REQUIRED, "one side: an HF dir (config.json) or a Megatron checkpoints dir (tracker, iter_*/)"),
    "b": Arg(Path, REQUIRED, "the other side, of either kind"),
    "seq_len": Arg(int, "1024", "positions compared (capped at the models' max_position_embeddings, said so)"),
    "tolerance": Arg(float, "1e-4", "largest max |logit difference| that passes (exit 2 above it, naming the "
                                    "likely cause)"),
    "tp": Arg(int, None, "processes a Megatron side loads at; none = a legacy side's tp, else 1"),
    "report": Arg(Path, None, "where the report JSON goes; none = <b>/verify.json"),
}


def cmd_verify(args) -> int:
    """Logits of a and b (HF or Megatron each) on one prompt: HF vs HF in this process, a Megatron side
    under torchrun. 0 within tolerance; 2 above it (the error names both sides, the max diff and the
    likely cause; the report has the rest) or if it cannot run."""
    from pipeline.convert import verify

    kv = key_values(args.pairs, VERIFY_ARGS)
    for key in ("a", "b"):
        if key not in kv:
            raise ConfigError(f"{key}: required (pipeline verify a=<dir> b=<dir>)")
    out = kv.get("report", kv["b"] / verify.REPORT)
    report = verify.run(kv["a"], kv["b"], out, kv["seq_len"], kv["tolerance"], kv.get("tp"))
    log.info("%s; report: %s", verify.summary(report), out)
    if not report["passed"]:
        raise ConversionError(f"{report['problem']} (report: {out})")
    return 0


EVAL_ARGS = {
    "ckpt": Arg(Path, REQUIRED, "the model: an HF dir (config.json), or a Megatron checkpoints dir (converted to HF "
                                "in a temp dir first)"),
    "data": Arg(Path, REQUIRED, "a .bin/.idx prefix (<run>/mix/valid: also split by source) or a source file "
                                "(jsonl, json, parquet, txt), tokenized with the checkpoint's tokenizer"),
    "seq_len": Arg(int, REQUIRED, "block length, as train.seq_len (the tail shorter than a block is dropped)"),
    "max_tokens": Arg(int, None, "evaluate the first this many tokens' blocks only; none = all"),
    "batch_size": Arg(int, "8", "blocks per forward"),
    "document_mask": Arg(true_or_false, "true", "as train.document_mask: no attention across documents in a block"),
    "eod_mask_loss": Arg(true_or_false, "false", "as train.eod_mask_loss: no loss where the input is EOD"),
    "device": Arg(str, None, "cpu | cuda; none = cuda when there is one"),
    "report": Arg(Path, "eval.json", "where the report JSON goes"),
}
GENERATE_ARGS = {
    "ckpt": Arg(Path, REQUIRED, "the model: an HF dir, or a Megatron checkpoints dir (converted to HF first)"),
    "prompt": Arg(str, REQUIRED, "the text to continue"),
    "max_new_tokens": Arg(int, "32", "tokens generated per sample"),
    "samples": Arg(int, "1", "continuations of the prompt (more than 1 needs temperature > 0)"),
    "temperature": Arg(float, "0", "0: greedy; > 0: sampled at this temperature"),
    "seed": Arg(int, "0", "the sampling seed"),
    "device": Arg(str, None, "cpu | cuda; none = cuda when there is one"),
}


def model_args(kv: dict, command: str, table: dict) -> dict:
    """The required keys of a model command given, ckpt a directory, and the device."""
    for key, entry in table.items():
        if entry.default == REQUIRED and key not in kv:
            required = " ".join(f"{k}=..." for k, e in table.items() if e.default == REQUIRED)
            raise ConfigError(f"{key}: required (pipeline {command} {required})")
    if not kv["ckpt"].is_dir():
        raise ConfigError(f"ckpt: {kv['ckpt']} is not a directory")
    if kv.get("device") is None:
        import torch

        kv["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return kv


def hf_model_dir(ckpt: Path, scratch: Path) -> Path:
    """ckpt itself if it is an HF dir, else its Megatron checkpoint converted to HF under scratch."""
    if (ckpt / "config.json").is_file():
        return ckpt
    from pipeline.convert.convert import megatron_to_hf

    megatron_to_hf(ckpt, scratch / "hf")
    return scratch / "hf"


def cmd_eval(args) -> int:
    """Loss and perplexity of a checkpoint on a .bin/.idx or a source file; prints them, writes the report."""
    import tempfile

    from pipeline.files import write_json_atomic
    from pipeline.train.evaluate import evaluate

    kv = model_args(key_values(args.pairs, EVAL_ARGS), "eval", EVAL_ARGS)
    with tempfile.TemporaryDirectory(prefix="pipeline-eval-") as scratch:
        report = evaluate(hf_model_dir(kv["ckpt"], Path(scratch)), kv["data"], kv["seq_len"], kv.get("max_tokens"),
                          kv["batch_size"], kv["document_mask"], kv["eod_mask_loss"], kv["device"])
    report["checkpoint"] = str(kv["ckpt"])
    write_json_atomic(kv["report"], report)
    print(f"loss {report['loss']:.6f}  perplexity {report['perplexity']:.4f}  "
          f"({report['tokens']:,} tokens in {report['blocks']} blocks of {report['seq_len']})")
    for name, got in report["sources"].items():
        print(f"  {name}: loss {got['loss']:.6f} ({got['tokens']:,} tokens)" if got["loss"] is not None
              else f"  {name}: no tokens")
    log.info("report: %s", kv["report"])
    return 0


def cmd_generate(args) -> int:
    """Continuations of a prompt by a checkpoint, printed one per sample."""
    import tempfile

    from pipeline.train.evaluate import sample

    kv = model_args(key_values(args.pairs, GENERATE_ARGS), "generate", GENERATE_ARGS)
    with tempfile.TemporaryDirectory(prefix="pipeline-generate-") as scratch:
        rows = sample(hf_model_dir(kv["ckpt"], Path(scratch)), kv["prompt"], kv["max_new_tokens"], kv["samples"],
                      kv["temperature"], kv["seed"], kv["device"])
    for row in rows:
        print(f"--- sample {row['sample']}\n{row['prompt']}{row['text']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config_dirs(p):
        p.add_argument("--config-dir", action="append", metavar="DIR",
                       help="a config dir searched after the project's configs/ (repeatable; also "
                            "$PIPELINE_CONFIG_PATH, os.pathsep-separated): DIR/experiment/mine.yaml gives "
                            "experiment=mine")

    def with_overrides(p):
        p.add_argument("overrides", nargs="*",
                       help="Hydra overrides, e.g. experiment=tiny_cpu data.tokenize.workers=4 "
                            "+data.sources.mine={path: x.jsonl}")
        with_config_dirs(p)

    run = sub.add_parser("run", help="run the stages that are not done", epilog=run_help(),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    with_overrides(run)
    run.add_argument("-m", "--multirun", action="store_true",
                     help="sweep: one run per combination of the sweep overrides (train.lr=1e-3,3e-4, "
                          "train.seed=range(1,4)), in turn, each in <run_dir>/<its swept key=values>")
    run.add_argument("--cfg", choices=("job", "hydra", "all"),
                     help="print the composed config (job: resolved, as it would run; hydra: Hydra's node) "
                          "and run nothing")
    run.add_argument("--info", action="store_true",
                     help="print the config search path and the defaults list, and run nothing")
    run.add_argument("--only", help="run only these stages (comma separated); their upstream must be done")
    run.add_argument("--force", nargs="?", const="*", default="",
                     help="rerun these stages (comma separated) even if done; alone: the --only stages, or all")
    run.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    run.add_argument("--explain", action="store_true", help="print why each stage would run or be skipped")
    run.add_argument("--restart", default="", metavar="STAGES",
                     help="start these stages (comma separated) over: their partial work (checkpoints included) is "
                          "moved aside to <stage>.restarted-<time>/, never deleted")
    run.add_argument("--break-lock", action="store_true", help="take the run dir's lock even if it looks held (by a "
                     "job on another host that is gone, say); a live process of this host keeps it")
    run.add_argument("--config-from", metavar="RUN_DIR", help="rerun with an earlier run's resolved config "
                     "(RUN_DIR/config.yaml); overrides are key=value on top of it")
    run.set_defaults(func=cmd_run)

    status = sub.add_parser("status", help="which stages are done, their fingerprints, sizes, times")
    with_overrides(status)
    status.add_argument("--json", action="store_true", help="machine-readable: status, fingerprint, outputs")
    status.add_argument("--verify", action="store_true", help="re-check every published stage's outputs against its "
                        "manifest (sizes, full sha256) and name each that changed; exit 2 if any did")
    status.set_defaults(func=cmd_status)

    clean = sub.add_parser("clean", help="list (or with --yes remove) the partial dirs --restart moved aside")
    with_overrides(clean)
    clean.add_argument("--yes", action="store_true", help="remove them; without it, only list what would go")
    clean.set_defaults(func=cmd_clean)

    experiments = sub.add_parser("experiments", help="the experiments (configs/experiment/ and the user config "
                                                     "dirs), each with its one-line description")
    with_config_dirs(experiments)
    experiments.set_defaults(func=cmd_experiments)

    conv = sub.add_parser("convert", help="checkpoint HF <-> Megatron, or Megatron -> Megatron: src=<dir> dst=<dir> "
                                          "to=hf|megatron [key=value ...]", epilog=args_help(CONVERT_ARGS),
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    conv.add_argument("pairs", nargs="*", metavar="key=value")
    conv.set_defaults(func=cmd_convert)

    ver = sub.add_parser("verify", help="same logits? a=<dir> b=<dir> (HF or Megatron each) [key=value ...]",
                         epilog=args_help(VERIFY_ARGS), formatter_class=argparse.RawDescriptionHelpFormatter)
    ver.add_argument("pairs", nargs="*", metavar="key=value")
    ver.set_defaults(func=cmd_verify)

    ev = sub.add_parser("eval", help="loss and perplexity of a checkpoint (HF or Megatron) on a .bin/.idx or a source "
                                     "file: ckpt=<dir> data=<prefix|file> seq_len=N [key=value ...]",
                        epilog=args_help(EVAL_ARGS), formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("pairs", nargs="*", metavar="key=value")
    ev.set_defaults(func=cmd_eval)

    gen = sub.add_parser("generate", help="continuations of a prompt by a checkpoint: ckpt=<dir> prompt=... "
                                          "[max_new_tokens=N samples=K temperature=T]",
                         epilog=args_help(GENERATE_ARGS), formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("pairs", nargs="*", metavar="key=value")
    gen.set_defaults(func=cmd_generate)

    vdata = sub.add_parser("verify-data", help="check a .bin/.idx pair: structure, and token ids below --vocab-size")
    vdata.add_argument("prefix", metavar="PREFIX", help="the pair's path without .bin/.idx (or with either)")
    vdata.add_argument("--vocab-size", type=int, help="every token id must be below this")
    vdata.set_defaults(func=cmd_verify_data)

    pre = sub.add_parser("preprocess", help="drop-in for Megatron-LM tools/preprocess_data.py with an HF tokenizer")
    from pipeline.data.preprocess import add_arguments

    add_arguments(pre)
    pre.set_defaults(func=cmd_preprocess)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and hasattr(args, "overrides") and not any(r.startswith("-") for r in rest):
        args.overrides += rest  # overrides after an option, as Hydra takes them (`run --dry-run a=1`)
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        rc = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return rc
    except BrokenPipeError:  # `pipeline status --json | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 141  # as a tool killed by SIGPIPE (128 + 13)
    except PipelineError as e:  # config, data, stage and conversion errors: a message, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a quota, a read-only or forbidden path: named, exit 2
        if e.errno not in STORAGE_ERRORS:
            raise
        print(f"error: {storage_problem(e, Path(getattr(args, 'output_prefix', None) or Path.cwd()))}",
              file=sys.stderr)
        return 2
    except Exception as e:  # Hydra's composition errors carry the key in their cause chain
        if type(e).__module__.startswith(("hydra", "omegaconf")):
            chain, cause = [str(e)], e.__cause__
            while cause is not None:
                chain.append(str(cause))
                cause = cause.__cause__
            print("error: " + "\n  ".join(chain), file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
