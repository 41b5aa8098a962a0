"""Checkpoint conversion HF <-> Megatron torch_dist: bit-exact round trips per family, and bad inputs that
fail naming the tensor, leaving nothing (megatron-core's own reading of them: tests/e2e/test_convert_megatron.py)."""
import json

import pytest

from conftest import cli, tiny_hf


def hf_tensors(path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


ROUND_TRIPS = """
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file
from pipeline.convert.convert import hf_to_megatron, megatron_to_hf, megatron_to_megatron

def main(src, out):
    before, results = load_file(src / "model.safetensors"), {}
    for fmt in ("torch_dist", "torch"):
        for tp, pp in ((1, 1), (2, 1), (1, 2), (2, 2)):
            name = f"{fmt}_tp{tp}_pp{pp}"
            hf_to_megatron(src, out / name, tp=tp, pp=pp, fmt=fmt)
            megatron_to_hf(out / name, out / (name + "_hf"))
            after = load_file(out / (name + "_hf") / "model.safetensors")
            results[name] = sorted(k for k in after if not torch.equal(after[k], before[k]))
    # another layout without HF: legacy TP2 x PP2 -> legacy TP1 x PP2 -> torch_dist -> HF
    megatron_to_megatron(out / "torch_tp2_pp2", out / "relayout", tp=1, pp=2, fmt="torch")
    megatron_to_megatron(out / "relayout", out / "relayout_dist")
    megatron_to_hf(out / "relayout_dist", out / "relayout_hf")
    after = load_file(out / "relayout_hf" / "model.safetensors")
    results["relayout"] = sorted(k for k in after if not torch.equal(after[k], before[k]))
    results["names"] = sorted(after)
    print("RESULT " + json.dumps(results))

if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
"""


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_round_trips_are_bit_exact_at_every_layout_and_both_formats(tmp_path, family):
    """HF -> Megatron -> HF at TP1PP1, TP2PP1, TP1PP2, TP2PP2 in torch_dist and legacy torch, and legacy
    TP2PP2 -> TP1PP2 -> torch_dist -> HF without HF in between: every tensor back bit for bit (fp32)."""
    import subprocess
    import sys

    src = tiny_hf(family, tmp_path / "hf", **({} if family == "gpt2" else {"num_hidden_layers": 4}))
    proc = subprocess.run([sys.executable, "-c", ROUND_TRIPS, str(src), str(tmp_path)], capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, proc.stderr[-3000:]
    results = json.loads(line[len("RESULT "):])
    tied = json.loads((src / "config.json").read_text()).get("tie_word_embeddings", family == "gpt2")
    assert set(results.pop("names")) == set(hf_tensors(src)) - ({"lm_head.weight"} if tied else set())
    assert results and all(differ == [] for differ in results.values()), results
    assert sorted(p.name for p in (tmp_path / "torch_tp2_pp2" / "iter_0000000").iterdir()) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]




def drop_tensor(path, name):
    from safetensors.torch import save_file

    tensors = hf_tensors(path)
    del tensors[name]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def set_config(path, **values):
    config = json.loads((path / "config.json").read_text())
    config.update(values)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage,message", [
    (lambda p: set_config(p, architectures=["BertForMaskedLM"]), "architecture BertForMaskedLM is not supported"),
    (lambda p: drop_tensor(p, "model.layers.1.mlp.up_proj.weight"),
     "tensors the table needs but the checkpoint lacks: ['model.layers.1.mlp.up_proj.weight']"),
    (lambda p: set_config(p, num_key_value_heads=4),
     "model.layers.0.self_attn.k_proj.weight (hf_to_megatron): expected 64 rows, got 32"),
    (lambda p: set_config(p, vocab_size=1024),
     "model.embed_tokens.weight (hf_to_megatron): expected shape (1024, 64)"),
], ids=["architecture", "missing_tensor", "shape", "vocab"])
def test_bad_input_names_the_tensor_and_leaves_nothing(tmp_path, capsys, damage, message):
    src = tiny_hf("llama", tmp_path / "hf")
    damage(src)
    # in-process: these fail while reading the HF side, before megatron-core is loaded
    assert cli("convert", f"src={src}", f"dst={tmp_path / 'out'}", "to=megatron") == 2
    err = capsys.readouterr().err
    assert message in err, err[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no dst, no dst.partial




