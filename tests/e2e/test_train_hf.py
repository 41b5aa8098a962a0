"""The HF backend: block dataset, misconfigurations before compute, 2-process ZeRO-2, kill -9 resume."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.formats.indexed import IndexedReader
from pipeline.train.blocks import BlockDataset

from conftest import cli_subprocess, copy_data_stages, fast_overrides, kill_tree, log_losses

TRAIN = ("--only", "import,train")
QUICK = ("train.tracker=none", "train.logging_steps=1")


@pytest.fixture
def run_copy(base_run, tmp_path):
    return copy_data_stages(base_run, tmp_path / "run")


def test_block_dataset_is_the_bin_tokens_in_order_across_document_boundaries(base_run):
    prefix = base_run / "mix" / "train"
    tokens = np.asarray(IndexedReader(prefix).tokens)
    ds = BlockDataset(prefix, 128)
    assert len(ds) == tokens.size // 128
    joined = torch.cat([ds[i]["input_ids"] for i in range(len(ds))]).numpy()
    np.testing.assert_array_equal(joined, tokens[:len(ds) * 128])
    eod = json.loads((base_run / "tokenizer" / "pipeline_tokenizer.json").read_text())["eod_id"]
    inner_eods = sum(int((ds[i]["input_ids"][:-1] == eod).sum()) for i in range(len(ds)))
    assert inner_eods > 0  # documents run across block boundaries, separated by EOD
    assert torch.equal(ds[3]["labels"], ds[3]["input_ids"])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_same_seed_gives_the_same_block_order(base_run, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    ds = BlockDataset(base_run / "mix" / "train", 128)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))

    def first_batch(seed):
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, seed=seed, data_seed=seed,
                                 use_cpu=True, report_to=[])
        return next(iter(Trainer(model=model, args=args, train_dataset=ds).get_train_dataloader()))["input_ids"]

    assert torch.equal(first_batch(1), first_batch(1))
    assert not torch.equal(first_batch(1), first_batch(2))


def make_hf_model(path, vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(path)
    return path


@pytest.mark.parametrize("override,message", [
    ("train.global_batch_tokens=3000",
     "train.global_batch_tokens: 3000 tokens is not a multiple of micro_batch_size 4"),
    ("model.vocab_size=512", "model.vocab_size: the model has 512 embeddings but the tokenizer has 1024 tokens"),
    ("train.zero_stage=5", "train.zero_stage: must be 0, 1, 2 or 3"),
    ("model.num_key_value_heads=3", "model.num_key_value_heads: 4 attention heads are not divisible by 3"),
    ("train.seq_len=1024", "train.seq_len: 1024 is longer than model.max_position_embeddings 512"),
    ("train.global_batch_tokens=16777216",
     "one step needs 131072 sequences of 128 but the mixed train split has only"),
    ("init", "train.init: the model has 100 embeddings but the tokenizer has 1024 tokens"),
    ("train.tracker=tensorboard", "train.tracker: tensorboard is not installed; pip install tensorboard"),
], ids=lambda v: v.split("=")[0] if "=" in v or v == "init" else "")
def test_misconfiguration_is_reported_before_any_process_starts(corpus, run_copy, tmp_path, override, message):
    if override == "init":
        override = f"train.init={make_hf_model(tmp_path / 'small_vocab', 100)}"
    t0 = time.time()
    result = cli_subprocess("run", *fast_overrides(corpus, run_copy, *QUICK), override, *TRAIN)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert time.time() - t0 < 60 and "train: " not in result.stderr  # no launch
    assert not (run_copy / "train").exists()


def test_two_process_zero2_trains_loss_drops_and_the_hf_dir_generates(corpus, run_copy):
    args = fast_overrides(corpus, run_copy, *QUICK, "train.max_steps=40", "train.eval_every=20", "train.save_every=20")
    result = cli_subprocess("run", *args, *TRAIN)
    assert result.returncode == 0, result.stderr[-3000:]
    out = run_copy / "train"
    job = json.loads((out / "job.json").read_text())
    assert job["deepspeed"]["zero_optimization"]["stage"] == 2 and job["grad_accumulation"] == 2
    losses = log_losses(run_copy)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 40 and summary["tokens_seen"] == 40 * 2048 and summary["world_size"] == 2
    assert summary["eval_loss"] < losses[1] - 0.5, (losses[1], summary)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {"loss", "grad_norm", "learning_rate", "tokens_seen", "tokens_per_second",
            "tflops_per_device"} <= set(rows[5])
    assert "mfu" not in rows[5]  # no GPU, no peak: no made-up MFU
    from pipeline.train.throughput import flops_per_token

    flops = flops_per_token(job["model"], job["vocab_size"], job["train"]["seq_len"])
    tflops = summary["tokens_per_second"] * flops / 2 / 1e12
    assert summary["tflops_per_device"] == pytest.approx(tflops, rel=1e-3)  # logged to 4 significant digits

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(out / "hf"), AutoTokenizer.from_pretrained(out / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                 "generation_config.json"):
        assert (out / "hf" / name).is_file(), name
    ids = tok("def main():", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 8


def test_kill_9_mid_training_resumes_with_the_same_losses_as_an_uninterrupted_run(corpus, base_run, tmp_path):
    steps = ("train.max_steps=12", "train.save_every=4", "train.eval_every=4")
    runs = {}
    for name in ("straight", "killed"):
        runs[name] = copy_data_stages(base_run, tmp_path / name)
    args = lambda run_dir, *extra: ["run", *fast_overrides(corpus, run_dir, *QUICK, *steps, *extra), *TRAIN]  # noqa: E731
    assert cli_subprocess(*args(runs["straight"])).returncode == 0

    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args(runs["killed"])], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = runs["killed"] / "train.partial" / "checkpoints" / "checkpoint-8" / "PIPELINE_COMPLETE.json"
    deadline = time.time() + 300
    while time.time() < deadline and not marker.exists() and proc.poll() is None:
        time.sleep(0.05)
    kill_tree(proc)  # the driver, the launcher and both ranks
    # a SIGKILLed driver cannot remove DeepSpeed's /dev/shm segments for its port (69 MB a rank)
    for path in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"):
        if path.stat().st_mtime >= started:
            path.unlink(missing_ok=True)
    assert marker.exists() and not (runs["killed"] / "train").exists()
    held = sorted(p for p in (runs["killed"] / "train.partial").rglob("*") if p.is_file())

    # an identity change stops before anything is removed, naming the key and the ways on
    changed = cli_subprocess(*args(runs["killed"], "train.lr=2e-3"))
    assert changed.returncode == 2, changed.stderr[-3000:]
    assert "config train.lr: 0.001 -> 0.002" in changed.stderr and "--restart train" in changed.stderr
    assert "checkpoints/checkpoint-8" in changed.stderr and "[tokenizer]" not in changed.stderr
    assert all(p.is_file() for p in held)

    # how-only changes (port, tracker, log interval, memory estimate) resume from the checkpoint
    how_only = ("launcher.master_port=29617", "train.tracker=swanlab", "train.logging_steps=2",
                "launcher.gpu_memory_gb=40")
    explained = cli_subprocess(*args(runs["killed"], *how_only), "--explain")
    assert "resumes the partial work in train.partial/" in explained.stdout, explained.stdout
    assert "how only (resumes, reruns nothing): train.logging_steps: 1 -> 2" in explained.stdout
    resumed = cli_subprocess(*args(runs["killed"], *how_only))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint-8, step 8 of 12" in resumed.stderr + resumed.stdout
    summary = json.loads((runs["killed"] / "train" / "train_summary.json").read_text())
    assert summary["resumed_from"] == "checkpoint-8" and summary["resumed_step"] == 8
    straight, killed = log_losses(runs["straight"]), log_losses(runs["killed"])
    assert all(killed[step] == straight[step] for step in range(1, 9))
    # the resumed run logs every 2nd step; only a step 9 logged just before the kill may sit between
    assert sorted(killed) in (list(range(1, 9)) + [10, 12], list(range(1, 10)) + [10, 12])
    for step in (10, 12):  # the Trainer logs the mean loss since its last log
        assert killed[step] == pytest.approx((straight[step - 1] + straight[step]) / 2, rel=1e-6, abs=1e-6), step

    # opening the dashboard (the real `swanlab watch`) and deleting the summary do not make it stale
    swanlog = runs["killed"] / "train" / "swanlog"
    assert swanlog.is_dir()
    watch = subprocess.Popen([str(Path(sys.executable).with_name("swanlab")), "watch", str(swanlog), "-h", "127.0.0.1",
                              "-p", "29618"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(6)
    watch.terminate()
    watch.wait(30)
    (runs["killed"] / "train" / "train_summary.json").unlink()
    again = cli_subprocess(*args(runs["killed"], *how_only))
    assert again.returncode == 0 and "[train] skip: done" in again.stderr, again.stderr[-3000:]


def test_a_checkpoint_for_other_data_or_model_is_refused_and_half_written_ones_ignored(tmp_path):
    from pipeline.train.hf_backend import COMPLETE, last_complete_checkpoint

    identity = {"data_fingerprint": "d1", "model_fingerprint": "m1"}
    for step, marker in ((4, identity), (8, identity), (12, None)):  # 12: killed while saving
        (tmp_path / f"checkpoint-{step}").mkdir()
        if marker:
            (tmp_path / f"checkpoint-{step}" / COMPLETE).write_text(json.dumps({"step": step, **marker}))
    assert last_complete_checkpoint(tmp_path, identity).name == "checkpoint-8"
    with pytest.raises(SystemExit, match="different data fingerprint"):
        last_complete_checkpoint(tmp_path, {**identity, "data_fingerprint": "d2"})
    with pytest.raises(SystemExit, match="different model fingerprint"):
        last_complete_checkpoint(tmp_path, {**identity, "model_fingerprint": "m2"})


def test_continued_pretraining_starts_from_the_init_checkpoint(corpus, run_copy, tmp_path):
    """train.init: the model is that checkpoint (its shape, not model.*'s) and, with a vanishing lr,
    ends with its weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    init = tmp_path / "init"
    torch.manual_seed(3)
    LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=4)).save_pretrained(init)
    args = fast_overrides(corpus, run_copy, *QUICK, f"train.init={init}", "train.max_steps=4", "train.lr=1e-12",
                          "train.eval_every=4", "train.save_every=4")
    result = cli_subprocess("run", *args, *TRAIN)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = AutoModelForCausalLM.from_pretrained(run_copy / "train" / "hf")
    assert trained.config.num_hidden_layers == 3 and trained.config.hidden_size == 32
    original = AutoModelForCausalLM.from_pretrained(init)
    for (name, a), (_, b) in zip(trained.state_dict().items(), original.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_zero_stages_and_offload_train_to_the_same_loss(corpus, base_run, tmp_path):
    """ZeRO partitions state differently, not the math: 4 steps at stage 0, 1 and 3 + CPU offload
    (2 processes each) end at the same eval loss."""
    losses = {}
    for stage, offload in ((0, False), (1, False), (3, True)):
        run_dir = copy_data_stages(base_run, tmp_path / f"zero{stage}")
        overrides = fast_overrides(corpus, run_dir, *QUICK, "train.max_steps=4", "train.eval_every=4",
                                   "train.save_every=4", f"train.zero_stage={stage}", f"train.offload={offload}")
        result = cli_subprocess("run", *overrides, *TRAIN)
        assert result.returncode == 0, result.stderr[-3000:]
        job = json.loads((run_dir / "train" / "job.json").read_text())
        assert job["deepspeed"]["zero_optimization"]["stage"] == stage
        assert ("offload_param" in job["deepspeed"]["zero_optimization"]) == offload
        losses[stage] = json.loads((run_dir / "train" / "train_summary.json").read_text())["eval_loss"]
    assert max(losses.values()) - min(losses.values()) < 1e-3, losses
