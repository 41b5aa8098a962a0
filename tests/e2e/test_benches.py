"""Every bench in bench/ runs at its --smoke size and prints its `ratio:` summary line (bench/measure.py
ratio): nothing else runs the benches, and a bench nobody runs stops working. The figures themselves
are not checked: at these sizes, on a shared machine, they mean nothing."""
import re
import subprocess
import sys

import pytest

from conftest import REPO

RATIO = re.compile(r"^ratio: .+ = \d+\.\d+x \S.*$", re.MULTILINE)
# script and its extra arguments; --out where the bench takes one (tokenizer_sample.py uses a temp dir)
BENCHES = {
    "tokenize": ("tokenize.py", True),
    "tokenize_ray": ("tokenize.py --executor ray", True),
    "tokenizer_sample": ("tokenizer_sample.py", False),
    "train_hf": ("train_hf.py", True),
    "train_megatron": ("train_megatron.py", True),
    "convert": ("convert.py", True),
    "gpu_check": ("gpu_check.py", True),  # its --smoke: the GPU check's steps on the CPU, a 2-layer model
}


@pytest.mark.parametrize("name", list(BENCHES))
def test_bench_smoke_runs_and_prints_its_ratio(name, tmp_path):
    script, takes_out = BENCHES[name]
    path, *extra = script.split()
    out = ["--out", str(tmp_path)] if takes_out else []
    cmd = [sys.executable, str(REPO / "bench" / path), "--smoke", *extra, *out]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    assert RATIO.search(proc.stdout), proc.stdout[-3000:]
