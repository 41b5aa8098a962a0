"""Launchers (pipeline/launch.py): two torchrun "nodes" on loopback for both backends, the deepspeed
launcher over a hostfile, the srun command line, a dying rank, the experiments' dry-run plans,
and rerunning an earlier run's config."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline import launch
from pipeline.errors import ConfigError

from conftest import REPO, cli, cli_subprocess, copy_data_stages, fast_overrides

TRAIN = ("--only", "import,train")
QUICK = ("train.tracker=none", "train.max_steps=4", "train.save_every=2", "train.eval_every=2")
EXPERIMENTS = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml"))


@pytest.fixture
def run_copy(base_run, tmp_path):
    return copy_data_stages(base_run, tmp_path / "run")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_resolves_and_plans(experiment, tmp_path, capsys):
    assert cli("run", f"experiment={experiment}", f"run_dir={tmp_path / 'run'}", "--dry-run") == 0
    out = capsys.readouterr().out
    for field in ("world size", "tokens/step", "accumulation", "steps", "GiB per GPU"):
        assert field in out, (field, out)


def test_the_plan_warns_when_the_model_does_not_fit(tmp_path, capsys):
    """Llama-2-7B without model parallelism on 8 GPUs: ~86 GiB estimated against 80."""
    assert cli("run", "experiment=llama2_7b_continue", f"run_dir={tmp_path / 'run'}", "train.parallel.tp=1",
               "train.parallel.pp=1", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "WARNING    the estimate" in out and "raise train.parallel.tp/pp" in out, out
    assert cli("run", "experiment=llama2_7b_continue", f"run_dir={tmp_path / 'run'}", "--dry-run") == 0
    assert "WARNING    the estimate" not in capsys.readouterr().out  # TP2 x PP2, as the experiment says


def slurm_launcher(**kw):
    return OmegaConf.create({"name": "slurm", "nnodes": 2, "nproc_per_node": 8, "rdzv_endpoint": None,
                             "master_port": 29500, **kw})


def test_slurm_launches_one_torchrun_agent_per_node_with_srun():
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURMD_NODENAME": "gpu-a01"}
    cmd = launch.command(slurm_launcher(), Path("entry.py"), Path("job.json"), 0, Path("logs"), env)
    assert cmd[:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    torchrun = cmd[5:]
    assert torchrun[:3] == [sys.executable, "-m", "torch.distributed.run"]
    flags = dict(zip(torchrun[3:-2:2], torchrun[4:-2:2]))
    assert flags == {"--nnodes": "2", "--nproc_per_node": "8", "--max_restarts": "0", "--log-dir": "logs",
                     "--rdzv_backend": "c10d", "--rdzv_endpoint": "gpu-a01:29500", "--rdzv_id": "4242"}
    assert torchrun[-2:] == ["entry.py", "job.json"]
    with pytest.raises(ConfigError, match="SLURM_JOB_ID is unset"):
        launch.command(slurm_launcher(), Path("e"), Path("j"), 0, Path("l"), {})
    with pytest.raises(ConfigError, match="launcher.nnodes: 2, but this allocation has 4 nodes"):
        launch.command(slurm_launcher(), Path("e"), Path("j"), 0, Path("l"), {**env, "SLURM_JOB_NUM_NODES": "4"})


STAND_IN_SRUN = """#!/usr/bin/env bash
# srun for a machine without SLURM: the command once per node of --nodes, with SLURM_NODEID set
nodes=1
while [[ "$1" == --* ]]; do case "$1" in --nodes=*) nodes=${1#--nodes=};; esac; shift; done
pids=()
for ((i = 0; i < nodes; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""


def test_the_slurm_launcher_trains_through_srun_on_two_agents(corpus, run_copy, tmp_path):
    """The srun line the slurm launcher makes, run by a stand-in srun: two torchrun agents on loopback
    meet at the c10d rendezvous on the driver's node and train to the end."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(STAND_IN_SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "2",
           "SLURMD_NODENAME": "127.0.0.1", "PYTHONUNBUFFERED": "1"}
    args = fast_overrides(corpus, run_copy, *QUICK, "launcher=slurm", "launcher.nnodes=2", "launcher.nproc_per_node=1",
                          f"launcher.master_port={launch.free_port()}")
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", *args, *TRAIN], env=env,
                            capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "launch: srun --nodes=2" in result.stderr
    summary = json.loads((run_copy / "train" / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["world_size"] == 2


def test_a_bad_hostfile_names_its_line(tmp_path, capsys):
    hostfile = tmp_path / "hostfile"
    args = ("run", "launcher=deepspeed", f"launcher.hostfile={hostfile}", f"run_dir={tmp_path / 'r'}", "--dry-run")
    hostfile.write_text("# two nodes, 2 processes each (tiny_cpu)\nnode0 slots=2\nnode1 gpus=2\n")
    assert cli(*args) == 2
    assert f"{hostfile}:3: expected '<host> slots=<n>', got 'node1 gpus=2'" in capsys.readouterr().err
    hostfile.write_text("node0 slots=8\nnode1 slots=8\n")
    assert cli(*args) == 2
    assert f"{hostfile}:1: node0 has 8 slots but launcher.nproc_per_node is 2" in capsys.readouterr().err
    hostfile.write_text("node0 slots=2\nnode1 slots=2\n")
    assert cli(*args) == 0


def test_deepspeed_launcher_with_a_localhost_hostfile_trains_the_hf_backend(corpus, run_copy, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    port = launch.free_port()
    result = cli_subprocess("run", *fast_overrides(corpus, run_copy, *QUICK, "launcher=deepspeed", "launcher.nnodes=1",
                                                   "launcher.nproc_per_node=2", f"launcher.hostfile={hostfile}",
                                                   f"launcher.master_port={port}"), *TRAIN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"--hostfile {hostfile}" in result.stderr  # the launch line the stage logs
    summary = json.loads((run_copy / "train" / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["world_size"] == 2

    # the same job under the user's own torchrun, through `-m pipeline.train`, into another work dir
    job = json.loads((run_copy / "train" / "job.json").read_text())
    job["work_dir"] = str(tmp_path / "direct")
    (tmp_path / "direct").mkdir()
    (tmp_path / "job.json").write_text(json.dumps(job))
    direct = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(launch.free_port()), "-m", "pipeline.train", str(tmp_path / "job.json")],
                            capture_output=True, text=True)
    assert direct.returncode == 0, direct.stderr[-3000:]
    again = json.loads((tmp_path / "direct" / "train_summary.json").read_text())
    assert again["steps"] == 4 and again["world_size"] == 2 and again["eval_loss"] == summary["eval_loss"]


@pytest.mark.parametrize("backend", ["hf", "megatron"])
def test_two_torchrun_nodes_on_loopback_train_to_the_end(backend, corpus, run_copy):
    """Node 0 is the driver; node 1 runs the same command, waits for the train stage and joins."""
    endpoint = f"127.0.0.1:{launch.free_port()}"
    experiment = ("experiment=tiny_cpu_megatron",) if backend == "megatron" else ()
    args = ["run", *fast_overrides(corpus, run_copy, *experiment, *QUICK, "launcher=torchrun", "launcher.nnodes=2",
                                   "launcher.nproc_per_node=1", f"launcher.rdzv_endpoint={endpoint}"), *TRAIN]
    nodes = [subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env={**os.environ, "NODE_RANK": str(n)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (1, 0)]
    outputs = [node.communicate(timeout=540) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert "node 1: waiting for node 0" in outputs[0][1]
    summary = json.loads((run_copy / "train" / "train_summary.json").read_text())
    assert summary["steps"] == 4
    if backend == "megatron":
        assert summary["layout"] == {"tp": 2, "pp": 1, "vpp": None, "dp": 1}  # TP across the two nodes
    else:
        assert summary["world_size"] == 2
    assert (run_copy / "train" / "train_node1.log").is_file()


def rank_process(rank: int, job: Path):
    """pid of the training process with this RANK for this job (found through /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        launcher = b"torch.distributed.run" in cmdline
        if str(job).encode() in cmdline and f"RANK={rank}".encode() in environ and not launcher:
            return int(proc.name)
    return None


def test_a_rank_that_dies_fails_the_run_with_its_error_and_a_rerun_resumes(corpus, run_copy):
    args = ["run", *fast_overrides(corpus, run_copy, "train.tracker=none", "train.max_steps=12", "train.save_every=4",
                                   "train.eval_every=4"), *TRAIN]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    partial = run_copy / "train.partial"
    marker = partial / "checkpoints" / "checkpoint-4" / "PIPELINE_COMPLETE.json"
    deadline = time.time() + 300
    while time.time() < deadline and not marker.exists() and proc.poll() is None:
        time.sleep(0.05)
    victim = rank_process(1, partial / "job.json")
    assert marker.exists() and victim, "training did not reach its first checkpoint"
    os.kill(victim, signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == 2
    assert "training exited with status" in err and "rank 1 on" in err and "Signal 9 (SIGKILL)" in err, err[-3000:]
    resumed = cli_subprocess(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run_copy / "train" / "train_summary.json").read_text())
    assert summary["resumed_from"] is not None and summary["steps"] == 12


def test_a_rank_exception_is_reported_with_its_message(tmp_path):
    """A Python error in one rank reaches the stage error through torchrun's summary (`record`)."""
    script = tmp_path / "entry.py"
    script.write_text("import os\nfrom torch.distributed.elastic.multiprocessing.errors import record\n"
                      "@record\ndef main():\n    if os.environ['RANK'] == '1':\n"
                      "        raise ValueError('shard 7 is corrupt')\nmain()\n")
    log_path = tmp_path / "train.log"
    launcher = OmegaConf.create({"name": "local", "nnodes": 1, "nproc_per_node": 2})
    cmd = launch.command(launcher, script, tmp_path / "job.json", launch.free_port(), tmp_path / "logs")
    assert launch.run_logged(cmd, log_path, dict(os.environ)) != 0
    report = launch.failure_report([log_path])
    assert "rank 1 on" in report and "exit code 1:" in report
    assert "ValueError: shard 7 is corrupt" in report.splitlines()[0]


def test_config_from_reruns_an_earlier_run_and_records_its_environment(corpus, base_run, tmp_path, capsys):
    env = json.loads((base_run / "environment.json").read_text())
    assert {"torch", "transformers", "megatron-core", "deepspeed", "hydra-core"} <= set(env["packages"])
    assert env["git"] is None or len(env["git"]["commit"]) == 40
    assert env["seeds"] == {"data.mix.seed": 42, "train.seed": 42}
    # the same config, elsewhere: every stage of the data path plans to run again there, train included
    again = tmp_path / "again"
    assert cli("run", "--config-from", str(base_run), f"run_dir={again}", "--dry-run") == 0
    plan = capsys.readouterr().out
    assert [line.split()[:2] for line in plan.splitlines()[:3]] == [["tokenizer", "run"], ["tokenize", "run"],
                                                                    ["mix", "run"]]
    assert cli("run", "--config-from", str(base_run), "--dry-run") == 0  # in place: all done
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()[:3]] == ["skip"] * 3
    assert cli("run", "--config-from", str(base_run), "model=gpt2_124m", "--dry-run") == 2
    assert "only key=value overrides apply" in capsys.readouterr().err
