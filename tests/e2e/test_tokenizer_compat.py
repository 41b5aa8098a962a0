"""The tokenizer dir the pipeline writes loads with transformers 4.x, which lm-eval and serving stacks
still pin, and encodes as transformers 5 does. Each 4.x is installed into a throwaway venv (cached under
/tmp, keyed by the version spec and this Python), without torch: AutoTokenizer needs none. Skipped only
where pip cannot install it (no index or wheel reachable), with pip's reason."""
import hashlib
import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from pipeline.data.tokenizer import copy_tokenizer

# 4.44: the oldest 4.4x, on tokenizers < 0.20 (the old merges form); the newest 4.x, on tokenizers >= 0.20
SPECS = ("transformers==4.44.*", "transformers>=4.44,<5")
TEXTS = ["def f(x):\n    return x + 1\n", "  leading spaces, <|endoftext|> inside, and ünïcödé 中文",
         "The quick brown fox.<|endoftext|>"]
LOAD = """
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
texts = json.loads(sys.argv[2])
print(json.dumps({"version": __import__("transformers").__version__, "ids": [tok(t).input_ids for t in texts],
                  "eos": tok.eos_token_id, "pad": tok.pad_token_id, "max": tok.model_max_length}))
"""


def venv_with(spec: str) -> Path:
    key = hashlib.sha256(f"{spec} {sys.version}".encode()).hexdigest()[:12]
    root = Path(f"/tmp/pipeline-tokenizer-compat-{key}")
    python = root / "bin" / "python"
    if not (root / "ready").is_file():
        try:
            venv.create(root, clear=True, with_pip=True)
        except subprocess.CalledProcessError as e:  # no ensurepip in this Python
            pytest.skip(f"cannot make a venv with pip: {e}")
        # --no-compile: byte-compiling transformers' thousands of files is half the install time;
        # one retry: with no index reachable, the skip comes in seconds, not minutes
        try:
            pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                  "--no-compile", "--retries", "1", "--timeout", "20", spec, "tokenizers"],
                                 capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.skip(f"pip install {spec} took over 300 s")
        if pip.returncode != 0:
            pytest.skip(f"pip cannot install {spec}: {pip.stderr.strip().splitlines()[-1:]}")
        (root / "ready").touch()
    return python


@pytest.fixture(scope="module")
def beside_a_model(tokenizer_dir, tmp_path_factory):
    """The stage's tokenizer dir as train/hf and export/hf get it (model_max_length = train.seq_len)."""
    out = tmp_path_factory.mktemp("beside_model")
    copy_tokenizer(tokenizer_dir, out, model_max_length=256)
    return out


@pytest.mark.parametrize("spec", SPECS)
def test_transformers_4x_loads_our_tokenizer_and_encodes_as_5_does(spec, tokenizer_dir, beside_a_model):
    from transformers import AutoTokenizer

    python = venv_with(spec)
    for directory, max_length in ((tokenizer_dir, None), (beside_a_model, 256)):
        run = subprocess.run([str(python), "-c", LOAD, str(directory), json.dumps(TEXTS)], capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        old = json.loads(run.stdout.strip().splitlines()[-1])
        assert old["version"].startswith("4.")
        new = AutoTokenizer.from_pretrained(str(directory))
        assert old["ids"] == [new(t).input_ids for t in TEXTS]
        assert old["eos"] == old["pad"] == new.eos_token_id == new.pad_token_id
        if max_length:
            assert old["max"] == new.model_max_length == max_length
