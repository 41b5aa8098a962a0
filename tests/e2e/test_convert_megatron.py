"""Checkpoints in megatron-core itself: an HF model converted at TP=2 gives the HF logits under torchrun, and
continued pretraining from an HF init (import, megatron training at TP=2, export) starts from the init's loss."""
import json

import pytest
import torch

from conftest import cli_subprocess, convert, copy_data_stages, fast_overrides, log_losses, tiny_hf


@pytest.mark.parametrize("family,fmt", [("llama", "torch_dist"), ("qwen2", "torch"), ("gpt2", "torch_dist"),
                                        ("qwen3", "torch_dist"), ("llama3", "torch")])
def test_megatron_core_at_tp2_gives_the_hf_logits(tmp_path, family, fmt):
    """Loaded in megatron-core at TP=2 under torchrun (torch_dist through dist_checkpointing, legacy files
    straight into each rank's module with strict names and shapes)."""
    src = tiny_hf(family, tmp_path / "hf")
    assert convert(f"src={src}", f"dst={tmp_path / 'mg'}", "to=megatron", "tp=2", f"format={fmt}").returncode == 0
    result = cli_subprocess("verify", f"a={src}", f"b={tmp_path / 'mg'}", "tp=2", "tolerance=1e-4")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "mg" / "verify.json").read_text())
    assert report["tp"] == 2 and report["max_abs_diff"] < 1e-4 and report["top1_agreement"] == 1.0, report
    from transformers import AutoModelForCausalLM

    # back to HF in 100 KB shards: written tensor by tensor, with an index
    converted = convert(f"src={tmp_path / 'mg'}", f"dst={tmp_path / 'back'}", "to=hf", "max_shard_size=100KB")
    assert converted.returncode == 0
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    for name, tensor in AutoModelForCausalLM.from_pretrained(src).state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert type(back).__name__ == json.loads((src / "config.json").read_text())["architectures"][0]


FIRST_BATCH = """
import json, sys, torch
import torch.distributed as dist
from pathlib import Path
from pipeline.train.mcore import cpu as megatron_cpu, data as me

job = json.loads(Path(sys.argv[1]).read_text())
job["work_dir"] = sys.argv[2]  # the dataset's index cache goes here, not into the run
megatron_cpu.install()
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # megatron's builder wants a group
train, _ = me.build_datasets(job, job["total_steps"] * job["global_batch_sequences"], 0)
samples = [train[i] for i in range(job["global_batch_sequences"])]
torch.save({k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "position_ids")}, sys.argv[3])
"""


@pytest.mark.parametrize("init_format", ["hf", "legacy_tp2_pp2_local"])
def test_continued_pretraining_hf_init_megatron_tp2_then_export(corpus, base_run, tmp_path, init_format):
    """HF tiny Llama -> import (torch_dist, checked by logits) -> megatron training at TP=2 -> export to HF.
    The first step's loss is the HF model's loss on the same global batch, and with a vanishing lr the
    exported model is the init. The same from that model as a legacy TP2 PP2 checkpoint with local norm
    names (`pipeline convert ... format=torch transformer_impl=local`), which the import stage turns
    into torch_dist."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer


    hf_init = init = tiny_hf("llama", tmp_path / "init", vocab_size=1024)
    if init_format != "hf":
        init = tmp_path / "legacy"
        assert cli_subprocess("convert", f"src={hf_init}", f"dst={init}", "to=megatron", "tp=2", "pp=2",
                              "format=torch", "transformer_impl=local").returncode == 0
    run_dir = copy_data_stages(base_run, tmp_path / "run")
    result = cli_subprocess("run", *fast_overrides(corpus, run_dir, "experiment=tiny_cpu_megatron",
                                                   "train.tracker=none", f"train.init={init}", "train.max_steps=2",
                                                   "train.lr=1e-12", "train.save_every=2", "train.eval_every=2"),
                            "--only", "import,train,export")
    assert result.returncode == 0, result.stderr[-3000:]
    job = json.loads((run_dir / "train" / "job.json").read_text())
    assert job["model"]["num_layers"] == 2 and job["model"]["hidden_size"] == 64  # the init's shape
    assert job["init"] == str(run_dir / "import" / "megatron")
    imported = json.loads((run_dir / "import" / "MANIFEST.json").read_text())["metrics"]
    assert imported["imported"] and imported["verify"]["max_abs_diff"] < 1e-4
    overrides = fast_overrides(corpus, run_dir, "experiment=tiny_cpu_megatron", "train.tracker=none",
                               f"train.init={init}", "train.max_steps=2", "train.lr=1e-12", "train.save_every=2",
                               "train.eval_every=2", "train.parallel.tp=1")
    plan = cli_subprocess("run", *overrides, "--dry-run").stdout  # another layout: nothing to redo
    assert {line.split()[0]: line.split()[1] for line in plan.split("\n\n")[0].splitlines()} == {
        "tokenizer": "skip", "tokenize": "skip", "mix": "skip", "import": "skip", "train": "skip", "export": "skip"}
    export = json.loads((run_dir / "export" / "MANIFEST.json").read_text())["metrics"]
    assert export["hf_vs_trained"]["max_abs_diff"] < 1e-4

    batch = tmp_path / "batch.pt"
    subprocess.run([sys.executable, "-c", FIRST_BATCH, str(run_dir / "train" / "job.json"), str(tmp_path / "cache"),
                    str(batch)], check=True, capture_output=True)
    batch = torch.load(batch)
    model = AutoModelForCausalLM.from_pretrained(hf_init).eval()
    with torch.no_grad():
        # train.document_mask: the HF backend's packed-document path (position ids reset at each EOD)
        logits = model(batch["tokens"], position_ids=batch["position_ids"], use_cache=False).logits
    hf_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))
    assert log_losses(run_dir)[1] == pytest.approx(float(hf_loss), abs=1e-4)

    hf = run_dir / "export" / "hf"
    exported = AutoModelForCausalLM.from_pretrained(hf)
    for (name, a), (_, b) in zip(exported.state_dict().items(), model.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    tok = AutoTokenizer.from_pretrained(hf)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                 "generation_config.json"):
        assert (hf / name).is_file(), name
    ids = tok("def main():", return_tensors="pt").input_ids
    assert exported.generate(ids, max_new_tokens=6, do_sample=False).shape[1] == ids.shape[1] + 6
