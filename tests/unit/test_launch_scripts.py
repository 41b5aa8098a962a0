"""launch/deepspeed.sh, launch/slurm.sbatch and `python -m pipeline.train`: the command each composes,
and an error that says what to do where one used to fail with a shell or Python traceback."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_script(script: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "launch" / script)], cwd=cwd, env={"PATH": "/usr/bin:/bin", **env},
                          capture_output=True, text=True)


def echo_pipeline(tmp_path: Path) -> str:
    """A stand-in for the pipeline CLI that prints the arguments it was given."""
    stub = tmp_path / "pipeline-stub"
    stub.write_text('#!/usr/bin/env bash\necho "$@"\n')
    stub.chmod(0o755)
    return str(stub)


def test_deepspeed_script_counts_the_hostfile_relative_to_the_caller(tmp_path):
    (tmp_path / "hosts").write_text("# two nodes\nnode-a slots=8\nnode-b slots=8\n")
    result = run_script("deepspeed.sh", {"HOSTFILE": "hosts", "PIPELINE": echo_pipeline(tmp_path)}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"launcher.hostfile={tmp_path / 'hosts'} launcher.nnodes=2 launcher.nproc_per_node=8" in result.stdout


def test_deepspeed_script_without_a_usable_hostfile_says_what_to_write(tmp_path):
    missing = run_script("deepspeed.sh", {"HOSTFILE": "absent"}, tmp_path)
    assert missing.returncode == 2 and "copy launch/hostfile.example" in missing.stderr
    (tmp_path / "empty").write_text("# nothing yet\n")
    empty = run_script("deepspeed.sh", {"HOSTFILE": "empty"}, tmp_path)
    assert empty.returncode == 2 and "lists no host" in empty.stderr


def test_slurm_script_outside_an_allocation_says_to_sbatch_it(tmp_path):
    outside = run_script("slurm.sbatch", {}, tmp_path)
    assert outside.returncode == 2 and "sbatch launch/slurm.sbatch" in outside.stderr
    inside = run_script("slurm.sbatch", {"SLURM_JOB_NUM_NODES": "4", "SLURM_SUBMIT_DIR": str(REPO),
                                         "PIPELINE": echo_pipeline(tmp_path)}, tmp_path)
    assert inside.returncode == 0, inside.stderr
    assert "launcher=slurm launcher.nnodes=4 launcher.nproc_per_node=8" in inside.stdout


def test_train_entry_has_a_usage_instead_of_a_traceback(tmp_path):
    def entry(*args):
        return subprocess.run([sys.executable, "-m", "pipeline.train", *args], capture_output=True, text=True)

    helped = entry("--help")
    assert helped.returncode == 0 and "job.json" in helped.stdout
    missing = entry(str(tmp_path / "job.json"))
    assert missing.returncode == 2 and "no such job file" in missing.stderr and "Traceback" not in missing.stderr


def test_convert_of_the_hf_backends_checkpoints_dir_names_what_to_give(tmp_path, capsys):
    from pipeline.cli import main

    (tmp_path / "checkpoints" / "checkpoint-8").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-8" / "config.json").write_text("{}")
    assert main(["convert", f"src={tmp_path / 'checkpoints'}", f"dst={tmp_path / 'out'}", "to=hf"]) == 2
    err = capsys.readouterr().err
    assert "HF Trainer checkpoints" in err and "checkpoint-8" in err and not (tmp_path / "out").exists()
