"""The runner: skip, rerun exactly what changed, explain, status, lock, resolved config saved."""
import json
import os
import shutil
import socket

import pytest
from omegaconf import OmegaConf

from pipeline.config import compose
from pipeline.errors import StageError
from pipeline.lock import RunLock
from pipeline.runner import Runner
from pipeline.stages import STAGES

from conftest import DATA_ONLY, cli, cli_subprocess, copy_data_stages, fast_overrides


def finished(run_dir):
    return {s: json.loads((run_dir / s / "MANIFEST.json").read_text())["finished"]
            for s in ("tokenizer", "tokenize", "mix")}


@pytest.fixture
def run_copy(base_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir)
    return run_dir


def test_unchanged_rerun_skips_every_stage(corpus, run_copy):
    before = finished(run_copy)
    result = cli_subprocess("run", *fast_overrides(corpus, run_copy), *DATA_ONLY)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("skip: done") == 3
    assert finished(run_copy) == before


def test_changed_weights_rerun_only_mix_and_explain_names_the_key(corpus, run_copy):
    before = finished(run_copy)
    args = fast_overrides(corpus, run_copy, "data.mix.weights.code=0.5")
    result = cli_subprocess("run", *args, *DATA_ONLY, "--explain")
    assert "config data.mix.weights.code: 0.12 -> 0.5" in result.stdout
    assert cli("run", *args, *DATA_ONLY) == 0
    after = finished(run_copy)
    assert after["tokenizer"] == before["tokenizer"] and after["tokenize"] == before["tokenize"]
    assert after["mix"] > before["mix"]


def test_changed_tokenize_key_reruns_tokenize_and_mix_but_workers_do_not(corpus, run_copy):
    before = finished(run_copy)
    assert cli("run", *fast_overrides(corpus, run_copy, "data.tokenize.workers=1"), *DATA_ONLY) == 0
    assert finished(run_copy) == before  # worker count changes how, not what
    assert cli("run", *fast_overrides(corpus, run_copy, "data.tokenize.append_eod=false"), *DATA_ONLY) == 0
    after = finished(run_copy)
    assert after["tokenizer"] == before["tokenizer"]
    assert after["tokenize"] > before["tokenize"] and after["mix"] > before["mix"]


def test_changed_input_file_is_named_by_explain(corpus, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    args = fast_overrides(data, tmp_path / "run")
    assert cli("run", *args, "--only", "tokenizer") == 0
    with open(data / "math.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    out = cli_subprocess("run", *args, *DATA_ONLY, "--explain").stdout
    assert f"input {data / 'math.jsonl'} changed" in out


def test_status_json_lists_fingerprints_and_outputs(corpus, run_copy):
    result = cli_subprocess("status", *fast_overrides(corpus, run_copy), "--json")
    rows = {r["stage"]: r for r in json.loads(result.stdout)}
    # not trained
    assert [r["status"] for r in rows.values()] == ["done", "done", "done", "missing", "missing", "missing"]
    assert os.path.isfile(rows["mix"]["outputs"]["train.bin"])
    assert rows["mix"]["fingerprint"] == rows["mix"]["manifest_fingerprint"]
    stale = json.loads(cli_subprocess("status", *fast_overrides(corpus, run_copy, "data.mix.seed=7"), "--json").stdout)
    assert [r["status"] for r in stale] == ["done", "done", "stale", "missing", "missing", "missing"]


def test_force_and_only(corpus, run_copy):
    before = finished(run_copy)
    assert cli("run", *fast_overrides(corpus, run_copy), "--only", "mix", "--force") == 0
    after = finished(run_copy)
    assert after["mix"] > before["mix"] and after["tokenize"] == before["tokenize"]


def test_partial_stage_is_never_read_downstream(corpus, run_copy):
    shutil.rmtree(run_copy / "tokenize")  # as if it never completed
    (run_copy / "tokenize.partial").mkdir()
    result = cli_subprocess("run", *fast_overrides(corpus, run_copy), "--only", "mix", "--force")
    assert result.returncode == 2 and "needs tokenize, which is not complete" in result.stderr


def test_resolved_config_is_saved_and_reloads(corpus, run_copy):
    saved = OmegaConf.load(run_copy / "config.yaml")
    assert saved.data.mix.weights.web == 0.85 and saved.tokenizer.vocab_size == 1024


def test_lock_refuses_a_live_writer_and_takes_over_a_dead_ones(tmp_path):
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(StageError, match="in use by pid"):
        RunLock(tmp_path).__enter__()
    lock.write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": socket.gethostname()}))
    with RunLock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_every_experiment_config_composes():
    for name in ("tiny_cpu", "seeds_mix"):
        cfg = compose([f"experiment={name}"])
        assert cfg.name == name
    seeds = compose(["experiment=seeds_mix"])
    assert dict(seeds.data.mix.weights) == {"fineweb_edu": 0.85, "the_stack": 0.12, "math": 0.03}
    assert seeds.data.mix.seed == 42




def test_large_inputs_are_identified_by_size_and_mtime_not_reread(tmp_path, monkeypatch):
    from pipeline import runner

    files = [tmp_path / f"{i}.jsonl" for i in range(3)]
    for f in files:
        f.write_text("x" * 1000)
    assert all("sha256" in v for v in runner.input_identities([str(f) for f in files]).values())
    monkeypatch.setattr(runner, "HASH_TOTAL_LIMIT", 2500)  # as if the corpus were over 1 GiB
    ids = runner.input_identities([str(f) for f in files])
    assert all(set(v) == {"size", "mtime_ns", "how"} for v in ids.values())


@pytest.mark.parametrize("overrides,message", [
    (("train.tracker=wandb",), "train.tracker: wandb is not installed; pip install wandb, or set train.tracker=none"),
    (("train.offload=true", "train.zero_stage=0"), "train.offload: CPU offload needs ZeRO stage 1-3"),
    (("experiment=tiny_cpu_megatron", "train.parallel.sequence_parallel=true"),
     "train.parallel.sequence_parallel: needs Transformer Engine or apex norms"),
    (("train.save_every=3", "train.eval_every=2"), "train.save_every: 3 is not a multiple of train.eval_every 2"),
    (("train.save_every=0.3", "train.eval_every=2"), "train.save_every: 0.3 and train.eval_every 2 mix a fraction"),
    (("launcher.nnodes=2",), "launcher.nnodes: 2 nodes with launcher=local"),
    (("launcher=deepspeed", "launcher.hostfile=/nonexistent/hostfile"),
     "launcher.hostfile: /nonexistent/hostfile does not exist"),
    (("train.resume_from=/nonexistent/checkpoint-4",),
     "train.resume_from: /nonexistent/checkpoint-4 is not a directory"),
], ids=lambda v: v[-1].split("=")[0] if isinstance(v, tuple) else None)
def test_misconfigurations_fail_under_dry_run_and_before_the_first_stage(corpus, tmp_path, capsys, overrides, message):
    import importlib.util

    assert importlib.util.find_spec("wandb") is None  # the first case needs a machine without it
    args = fast_overrides(corpus, tmp_path / "run", *overrides)
    assert cli("run", *args, "--dry-run") == 2
    assert message in capsys.readouterr().err
    assert cli("run", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "tokenizer").exists() and not (tmp_path / "run" / "tokenizer.partial").exists()


def test_how_only_keys_leave_every_fingerprint_alone_and_are_named_by_explain(corpus, base_run, tmp_path, capsys):
    from pipeline.config import HOW_KEYS

    assert {"launcher", "train.parallel", "train.tracker", "train.logging_steps", "data.tokenize.workers",
            "export.tolerance"} <= set(HOW_KEYS)
    run_dir = copy_data_stages(base_run, tmp_path / "run")
    base = Runner(compose(fast_overrides(corpus, run_dir)), STAGES).plan()
    how = Runner(compose(fast_overrides(corpus, run_dir, "launcher.master_port=29999", "train.tracker=none",
                                        "train.logging_steps=5", "launcher.gpu_memory_gb=24", "export.tolerance=1e-2",
                                        "data.tokenize.workers=1", "train.keep_checkpoints=5")), STAGES).plan()
    assert [i.fingerprint for i in base] == [i.fingerprint for i in how]
    lr = Runner(compose(fast_overrides(corpus, run_dir, "train.lr=2e-3")), STAGES).plan()
    assert [i.stage.name for i, j in zip(base, lr) if i.fingerprint != j.fingerprint] == ["train", "export"]
    assert cli("run", *fast_overrides(corpus, run_dir, "data.tokenize.workers=1"), "--explain",
               "--only", "tokenizer,tokenize,mix") == 0
    out = capsys.readouterr().out
    assert "how only (resumes, reruns nothing): data.tokenize.workers: 2 -> 1" in out, out
    assert "tokenize   skip" in out


def test_keys_added_later_leave_older_runs_fingerprints_alone(corpus, tmp_path):
    """A field added after runs exist (config.added) is left out of the fingerprint at its default, so what
    is hashed is what the code before it hashed: an upgrade never makes a finished training stale. Any
    other value is identity."""
    from pipeline.config import ADDED_DEFAULTS

    assert {"model.head_dim", "model.rope_scaling", "model.qk_norm"} <= set(ADDED_DEFAULTS)
    run_dir = tmp_path / "run"
    base = {i.stage.name: i for i in Runner(compose(fast_overrides(corpus, run_dir)), STAGES).plan()}
    hashed = base["train"].parts["config"]["model"]
    assert "hidden_size" in hashed and not {k.split(".", 1)[1] for k in ADDED_DEFAULTS} & set(hashed), hashed
    same = Runner(compose(fast_overrides(corpus, run_dir, "model.qk_norm=false", "model.rope_scaling=none")),
                  STAGES).plan()
    assert [i.fingerprint for i in same] == [i.fingerprint for i in base.values()]
    other = {i.stage.name: i for i in Runner(compose(fast_overrides(corpus, run_dir, "model.head_dim=16")),
                                             STAGES).plan()}
    assert other["train"].fingerprint != base["train"].fingerprint
    assert other["train"].parts["config"]["model"]["head_dim"] == 16  # given, even if equal to the derived one


def test_a_manifest_that_hashed_now_how_only_keys_is_kept_and_migrated(corpus, base_run, tmp_path, caplog):
    """Runs made before a key was marked how-only hashed it: their output is still this config's."""
    caplog.set_level("INFO", logger="pipeline")
    run_dir = copy_data_stages(base_run, tmp_path / "run")
    path = run_dir / "tokenize" / "MANIFEST.json"
    man = json.loads(path.read_text())
    man["fingerprint_parts"]["config"]["data.tokenize"]["workers"] = 7  # as a manifest before the marks held it
    man["fingerprint"] = "0" * 64
    path.write_text(json.dumps(man))
    assert cli("run", *fast_overrides(corpus, run_dir), *DATA_ONLY) == 0
    assert "[tokenize] skip: done" in caplog.text
    assert json.loads(path.read_text())["fingerprint"] != "0" * 64
    assert json.loads((run_dir / "mix" / "MANIFEST.json").read_text())["finished"] == finished(base_run)["mix"]
