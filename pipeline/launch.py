"""How the train stage starts its ranks: one launcher per row of LAUNCHERS, each a command line.

    local      torchrun on this host (nnodes 1, a free port)
    torchrun   multi-node torchrun, c10d rendezvous at launcher.rdzv_endpoint. The same `pipeline run`
               runs on every node: node 0 is the driver (every stage), the others join only training
    deepspeed  the deepspeed launcher over a hostfile ("<host> slots=<n>" per line; ssh/pdsh to the
               other hosts, as deepspeed does)
    slurm      inside an sbatch/salloc allocation: `srun` starts one torchrun agent per node

The runner stays one process on one node. It runs the data and conversion stages once, launches
training, waits, and on failure reports which rank failed and how (torchrun's failure summary, from
every node's log), then the log paths. Each entry point's main is wrapped in torchelastic's `record`,
so a rank's Python exception reaches that summary with its traceback. The launch ends with the driver
(pipeline/lifetime.py), and a dead rank ends it within seconds, even when a helper of that rank holds
the output pipe open (run_logged).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, List, Mapping

import psutil

from pipeline import lifetime
from pipeline.errors import ConfigError

log = logging.getLogger("pipeline")
NODE_RANK_VARS = ("NODE_RANK", "SLURM_NODEID", "GROUP_RANK")  # this node's rank, first one set wins


def torchrun(launcher, nnodes: int, rendezvous: List[str], log_dir: Path) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
            "--nproc_per_node", str(launcher.nproc_per_node), "--max_restarts", "0", "--log-dir", str(log_dir),
            *rendezvous]


def c10d(endpoint: str, rdzv_id: str) -> List[str]:
    return ["--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", rdzv_id]


def local_command(launcher, port: int, log_dir: Path, env: Mapping[str, str]) -> List[str]:
    return torchrun(launcher, 1, ["--master_addr", "127.0.0.1", "--master_port", str(port)], log_dir)


def torchrun_command(launcher, port: int, log_dir: Path, env: Mapping[str, str]) -> List[str]:
    return torchrun(launcher, launcher.nnodes, [*c10d(launcher.rdzv_endpoint, launcher.rdzv_id),
                                                "--node_rank", str(node_rank(launcher, env))], log_dir)


def deepspeed_command(launcher, port: int, log_dir: Path, env: Mapping[str, str]) -> List[str]:
    exe = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    cmd = [exe, "--master_port", str(launcher.master_port if launcher.hostfile else port)]
    if launcher.hostfile:
        hosts = read_hostfile(launcher)
        cmd += ["--hostfile", launcher.hostfile, "--master_addr", launcher.master_addr or next(iter(hosts)),
                "--num_nodes", str(len(hosts))]
        if len(hosts) == 1:  # deepspeed checks ssh to the first host even when it will launch locally
            cmd.append("--no_ssh_check")
    return cmd + ["--num_gpus", str(launcher.nproc_per_node)]


def slurm_command(launcher, port: int, log_dir: Path, env: Mapping[str, str]) -> List[str]:
    if "SLURM_JOB_ID" not in env:
        raise ConfigError("launcher.name: slurm needs a SLURM allocation (SLURM_JOB_ID is unset); submit "
                          "launch/slurm.sbatch, or run inside salloc")
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    if nodes != launcher.nnodes:
        raise ConfigError(f"launcher.nnodes: {launcher.nnodes}, but this allocation has {nodes} nodes "
                          f"(SLURM_JOB_NUM_NODES); make them agree")
    # the batch script runs on the allocation's first node, which is where this driver is
    endpoint = launcher.rdzv_endpoint or f"{env.get('SLURMD_NODENAME') or socket.gethostname()}:{launcher.master_port}"
    agents = ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    return agents + torchrun(launcher, nodes, c10d(endpoint, env["SLURM_JOB_ID"]), log_dir)


LAUNCHERS = {"local": local_command, "torchrun": torchrun_command, "deepspeed": deepspeed_command,
             "slurm": slurm_command}


def command(launcher, entry: Path, job_path: Path, port: int, log_dir: Path,
            env: Mapping[str, str] = os.environ) -> List[str]:
    """The full command line that starts every rank of `entry` on `job_path` (the launcher name was
    checked by `validate` when the config was composed)."""
    return LAUNCHERS[launcher.name](launcher, port, log_dir, env) + [str(entry), str(job_path)]


def validate(launcher) -> None:
    """Launcher settings that can be checked before anything runs."""
    if launcher.name not in LAUNCHERS:
        raise ConfigError(f"launcher.name: '{launcher.name}' is not one of {', '.join(LAUNCHERS)}")
    if launcher.name == "local" and launcher.nnodes != 1:
        raise ConfigError(f"launcher.nnodes: {launcher.nnodes} nodes with launcher=local (this host only); use "
                          f"launcher=torchrun, deepspeed or slurm")
    if launcher.name == "torchrun" and launcher.nnodes > 1 and not launcher.rdzv_endpoint:
        raise ConfigError("launcher.rdzv_endpoint: multi-node torchrun needs node 0's host:port, the same on every "
                          "node (e.g. launcher.rdzv_endpoint=node0:29500)")
    if launcher.name == "deepspeed" and launcher.hostfile:
        read_hostfile(launcher)


def read_hostfile(launcher) -> Dict[str, int]:
    """host -> slots, from a deepspeed hostfile; every host must have launcher.nproc_per_node slots and
    there must be launcher.nnodes of them, since the batch arithmetic is planned from those two."""
    path = Path(launcher.hostfile)
    if not path.is_file():
        raise ConfigError(f"launcher.hostfile: {path} does not exist")
    hosts: Dict[str, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not m:
            raise ConfigError(f"{path}:{number}: expected '<host> slots=<n>', got '{line}'")
        if int(m.group(2)) != launcher.nproc_per_node:
            raise ConfigError(f"{path}:{number}: {m.group(1)} has {m.group(2)} slots but launcher.nproc_per_node is "
                              f"{launcher.nproc_per_node}; make them agree")
        hosts[m.group(1)] = int(m.group(2))
    if len(hosts) != launcher.nnodes:
        raise ConfigError(f"launcher.nnodes: {launcher.nnodes}, but {path} lists {len(hosts)} hosts")
    return hosts


def node_rank(launcher, env: Mapping[str, str] = os.environ) -> int:
    if launcher.node_rank is not None:
        return launcher.node_rank
    return int(next((env[v] for v in NODE_RANK_VARS if env.get(v)), 0))


def is_joining_node(launcher, env: Mapping[str, str] = os.environ) -> bool:
    """A multi-node torchrun node other than 0: it runs no stage, it joins node 0's training."""
    return launcher.name == "torchrun" and launcher.nnodes > 1 and node_rank(launcher, env) != 0


# ----------------------------------------------------------------------------- running and reporting

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DRAIN_SECONDS = 5.0  # once the launcher has exited, how long its output may still take to end
STOP_SECONDS = 10.0  # SIGTERM -> SIGKILL for what the launch left running (or all of it, if we stop early)
TAIL_BYTES = 1 << 20  # output kept in memory for the failure report once the log cannot be written
_UNLOGGED: Dict[Path, bytearray] = {}  # log path -> the output tail that could not be written to it
# set on Ctrl-C: the ranks' tracebacks as they are stopped go to the log only, not to the terminal
_MUTED = threading.Event()


def run_logged(cmd: List[str], log_path: Path, env: Dict[str, str]) -> int:
    """Run, copying the ranks' output byte for byte to our stderr (progress bars intact) and to log_path.

    The launcher runs in a session of its own and gets SIGTERM if this process dies (pipeline/lifetime.py).
    While it runs, the processes under it are noted every second; once it exits, those still running (a
    dead rank's checkpoint-writer helper, which holds the output pipe open) are stopped, and the output
    gets DRAIN_SECONDS more to end. So this returns at most STOP_SECONDS + DRAIN_SECONDS after the
    launcher exits, with its failure summary read.
    """
    env = {**env, lifetime.DRIVER_ENV: lifetime.driver_env()}
    _UNLOGGED.pop(log_path, None)
    _MUTED.clear()
    # started from the thread that waits for it below: its death signal must not fire while it runs
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            preexec_fn=lifetime.launcher_preexec())
    pump = threading.Thread(target=_pump, args=(proc.stdout, log_path), name="launch-output", daemon=True)
    pump.start()
    launcher, launched = psutil.Process(proc.pid), {}
    try:
        while proc.poll() is None:
            try:
                launched.update((p.pid, p) for p in launcher.children(recursive=True) if p.pid not in launched)
            except psutil.Error:
                pass
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
    except BaseException as e:  # Ctrl-C, or an error here: the launch must not outlive its wait
        if isinstance(e, KeyboardInterrupt):
            _MUTED.set()
        _stop([launcher, *launched.values()], "stopping the launch")
        proc.wait()
        raise
    finally:
        _stop(list(launched.values()), "the launch has exited; stopping what it left running")
        pump.join(DRAIN_SECONDS)
        if pump.is_alive():
            log.warning("the launch's output did not end within %.0f s of its exit (a process outside it holds the "
                        "pipe?); no longer waiting for it", DRAIN_SECONDS)
    return proc.returncode


def _stop(procs: List[psutil.Process], why: str) -> None:
    """SIGTERM the processes still running, SIGKILL those left after STOP_SECONDS."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                p.terminate()
                alive.append(p)
        except psutil.Error:
            pass
    if not alive:
        return
    log.warning("%s: %s", why, ", ".join(f"pid {p.pid}" for p in alive))
    _, alive = psutil.wait_procs(alive, timeout=STOP_SECONDS)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=1.0)


def _pump(pipe, log_path: Path) -> None:
    """Copy the launch's output to log_path and to our stderr until EOF. A log that cannot be written (a
    full disk) does not stop the copy: the output goes on to stderr, and its tail is kept for the report."""
    tail = bytearray()
    logf = None
    try:
        logf = open(log_path, "ab", buffering=0)  # unbuffered: a failed write shows at once, not at close
    except OSError as e:
        _log_lost(log_path, e, tail)
    with pipe:
        while chunk := pipe.read1(65536):
            rest = chunk
            while logf is not None and rest:
                try:
                    rest = rest[logf.write(rest):]
                except OSError as e:
                    _log_lost(log_path, e, tail)
                    logf.close()  # unbuffered: nothing left to flush
                    logf = None
            if logf is None:
                tail += rest
                del tail[:-TAIL_BYTES]
            if _MUTED.is_set():
                continue
            try:
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
            except (OSError, ValueError):  # our stderr is gone: the log still gets everything
                pass
    if logf is not None:
        logf.close()


def _log_lost(log_path: Path, error: OSError, tail: bytearray) -> None:
    log.error("cannot write %s (%s); the launch's output goes on to stderr only", log_path, error.strerror or error)
    _UNLOGGED[log_path] = tail  # the pump appends to it from now on


def _log_text(path: Path) -> str:
    """A launch's log, followed by the output that could not be written to it."""
    text = path.read_text(errors="replace") if path.is_file() else ""
    return text + bytes(_UNLOGGED.get(path, b"")).decode(errors="replace")


def root_causes(log_text: str) -> List[Dict[str, str]]:
    """The failed rank of each torchrun failure summary in a log ("Root Cause (first observed failure)"):
    its rank, host, exit code, and error (the last line of its traceback, or the signal)."""
    causes = []
    for section in log_text.split("Root Cause (first observed failure):")[1:]:
        block = re.split(r"^=+$", section, maxsplit=1, flags=re.M)[0]
        # "rank : 1 (local_rank: 1)", "exitcode : -9 (pid: 123)": the leading value
        fields = dict(re.findall(r"^\s+(rank|host|exitcode)\s*:\s*(\S+)", block, re.M))
        trace = [line.strip() for line in block.split("traceback :", 1)[-1].splitlines() if line.strip()]
        causes.append({**fields, "error": trace[-1] if trace else ""})
    return causes


def failure_report(logs: List[Path]) -> str:
    """The failed rank of every node's launch, then the driver log's last lines."""
    lines = []
    for path in (p for p in logs if p.is_file() or p in _UNLOGGED):
        for cause in root_causes(_log_text(path)):
            lines.append(f"rank {cause.get('rank', '?')} on {cause.get('host', '?')} failed, exit code "
                         f"{cause.get('exitcode', '?')}: {cause['error']} (log: {path})")
    head = "\n".join(lines) or "no torchrun failure summary in the logs; see their last lines"
    tail = _log_text(logs[0]).splitlines()[-25:]
    return f"{head}\nLast lines of {logs[0]}:\n" + "\n".join(tail)
