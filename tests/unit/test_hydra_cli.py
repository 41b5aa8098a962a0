"""Hydra as users know it, through `pipeline.cli.main`: multirun sweeps (a run dir per job, named after its
swept overrides), user config dirs searched beside ours, `--cfg`/`--info`, sources added from the command
line, `+key=` refused outside the schema, `pipeline experiments`, and the status/help/pipe details."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from pipeline.cli import override_dirname

from conftest import REPO, cli, fast_overrides

MINE = """# @package _global_
# mine: the default experiment at a lower learning rate
defaults:
  - tiny_cpu
name: mine
train:
  lr: 5.0e-4
"""


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_configs")
    (root / "experiment").mkdir()
    (root / "experiment" / "mine.yaml").write_text(MINE)
    return root


def composed(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert cli("run", "--cfg", "job", *args) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_multirun_of_two_values_makes_two_run_dirs(corpus, tmp_path, capsys):
    base = tmp_path / "sweep"
    assert cli("run", "-m", *fast_overrides(corpus, base, "tokenizer.vocab_size=300,320",
                                            "tokenizer.sample_docs_per_source=20"), "--only", "tokenizer") == 0
    out = capsys.readouterr().out
    for i, size in enumerate((300, 320), 1):
        run_dir = base / f"tokenizer.vocab_size={size}"
        assert f"job {i}/2: tokenizer.vocab_size={size} -> {run_dir}" in out
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert saved["run_dir"] == str(run_dir) and saved["tokenizer"]["vocab_size"] == size
        assert (run_dir / "tokenizer" / "MANIFEST.json").is_file()
    assert sorted(p.name for p in base.iterdir()) == ["tokenizer.vocab_size=300", "tokenizer.vocab_size=320"]


def test_multirun_is_the_cartesian_product_and_names_are_filesystem_safe(tmp_path, capsys):
    assert cli("run", "-m", f"run_dir={tmp_path}", "train.seed=range(1,3)", "train.lr=1e-3,3e-4", "--dry-run") == 0
    out = capsys.readouterr().out
    jobs = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("job ")]
    assert jobs == [f"{name} -> {tmp_path / name}" for name in (  # keys sorted, first override slowest
        "train.lr=0.001,train.seed=1", "train.lr=0.0003,train.seed=1",
        "train.lr=0.001,train.seed=2", "train.lr=0.0003,train.seed=2")]
    assert not any(tmp_path.iterdir())  # a dry run writes nothing
    a, b = (override_dirname([f"data.sources.web.path={p}"]) for p in ("/a/b.jsonl", "_a_b.jsonl"))
    assert "/" not in a and a != b and a.startswith("data.sources.web.path=_a_b.jsonl-")


def test_a_sweep_without_multirun_is_refused_with_hydras_hint(capsys):
    assert cli("run", "train.lr=1e-3,3e-4", "--dry-run") == 2
    assert "add --multirun" in capsys.readouterr().err


def test_a_user_config_dir_adds_an_experiment_beside_ours(user_dir, monkeypatch, capsys):
    cfg = composed(capsys, "--config-dir", str(user_dir), "experiment=mine")  # an override after an option too
    assert (cfg["name"], cfg["train"]["lr"], cfg["model"]["num_layers"]) == ("mine", 5e-4, 2)  # on top of tiny_cpu
    assert composed(capsys, "--config-dir", str(user_dir))["name"] == "tiny_cpu"  # ours is still the primary
    monkeypatch.setenv("PIPELINE_CONFIG_PATH", str(user_dir))
    assert composed(capsys, "experiment=mine")["name"] == "mine"
    assert cli("run", "--info", "experiment=mine") == 0
    info = capsys.readouterr().out
    assert f"file://{REPO / 'configs'}" in info and f"file://{user_dir}" in info
    assert "experiment/mine" in info and "experiment/tiny_cpu" in info
    assert cli("experiments") == 0
    listing = capsys.readouterr().out.splitlines()
    assert any(line.startswith("mine ") and "at a lower learning rate" in line and str(user_dir) in line
               for line in listing)
    assert any(line.startswith("tiny_cpu ") and "The default experiment" in line for line in listing)
    monkeypatch.setenv("PIPELINE_CONFIG_PATH", str(user_dir / "nonexistent"))
    assert cli("experiments") == 2
    assert "$PIPELINE_CONFIG_PATH" in capsys.readouterr().err


def test_a_source_added_from_the_command_line_gets_the_defaults(capsys):
    sources = composed(capsys, "+data.sources.mine={path: x.jsonl}", "+data.mix.weights.mine=0.1",
                       "data.sources.mine.text_field=body", "+data.sources.other.path=y.jsonl",
                       "+data.mix.weights.other=0")["data"]["sources"]
    assert sources["mine"] == {**sources["other"], "path": "x.jsonl", "text_field": "body"}
    assert sources["other"]["on_bad_record"] == "error" and sources["other"]["path"] == "y.jsonl"


@pytest.mark.parametrize("override, named, nearest", [
    ("+train.lrr=1e-3", "train.lrr", "did you mean train.lr?"),
    ("++train.parallel.tpp=2", "train.parallel.tpp", "did you mean train.parallel.tp?"),
    ("+train.hidden_size=64", "train.hidden_size", "did you mean model.hidden_size?"),
    ("+data.sources.web.text_feld=x", "data.sources.web.text_feld", "did you mean data.sources.web.text_field?"),
])
def test_plus_key_outside_the_schema_is_refused(override, named, nearest, capsys):
    assert cli("run", override, "--cfg", "job") == 2
    err = capsys.readouterr().err
    assert f"{named}: not a key of the schema" in err and nearest in err, err


def test_status_names_the_run_dir_and_json_survives_a_closed_pipe(tmp_path, capsys):
    assert cli("status", f"run_dir={tmp_path / 'none'}") == 0
    assert f"run dir: {tmp_path / 'none'} does not exist" in capsys.readouterr().out
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "status", "--json", f"run_dir={tmp_path}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.close()  # as `| head` does, before the status is written
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and "Traceback" not in err and f"run dir: {tmp_path}" in err, err


def test_help_lists_every_command_and_the_config_groups(capsys):
    for argv in (["--help"], ["run", "--help"]):
        with pytest.raises(SystemExit):
            cli(*argv)
    out = capsys.readouterr().out
    for command in ("run", "status", "clean", "experiments", "convert", "verify", "verify-data", "preprocess"):
        assert f"    {command} " in out, command
    assert "experiment=  gpt2_124m_pretrain" in out and "--cfg job" in out and "--multirun" in out
