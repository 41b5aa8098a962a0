"""The megatron backend under torchrun (2 gloo processes): TP=2 and PP=2 train, layouts agree on the
same init, kill -9 resumes at the same or another layout, bad layouts fail before any process starts."""
import json
import subprocess
import sys
import time

import pytest

from conftest import cli, cli_subprocess, copy_data_stages, fast_overrides, kill_tree, log_losses

TRAIN = ("--only", "import,train")
# 4 layers, so that PP=2 with 2 virtual stages a rank (the interleaved schedule) fits too
MEGATRON = ("experiment=tiny_cpu_megatron", "train.tracker=none", "train.logging_steps=1", "model.num_layers=4")
STEPS = ("train.max_steps=24", "train.save_every=8", "train.eval_every=8")
LAYOUTS = {"tp2": ("train.parallel.tp=2", "train.parallel.pp=1"),
           "pp2": ("train.parallel.tp=1", "train.parallel.pp=2"),
           "tp1": ("train.parallel.tp=1", "train.parallel.pp=1"),
           "vpp": ("train.parallel.tp=1", "train.parallel.pp=2", "train.parallel.vpp=2"),
           "tp2_recompute_full": ("train.parallel.tp=2", "train.parallel.pp=1", "train.parallel.recompute=full"),
           "pp2_selective_plain_optimizer": ("train.parallel.tp=1", "train.parallel.pp=2",
                                             "train.parallel.recompute=selective",
                                             "train.parallel.distributed_optimizer=false")}


def train_args(corpus, run_dir, *extra):
    return ["run", *fast_overrides(corpus, run_dir, *MEGATRON, *extra), *TRAIN]


def summary(run_dir):
    return json.loads((run_dir / "train" / "train_summary.json").read_text())


@pytest.fixture(scope="module")
def straight(corpus, base_run, tmp_path_factory):
    """Uninterrupted 24-step runs at TP=2 and at PP=2, the references for the tests below."""
    runs = {}
    for name in ("tp2", "pp2"):
        run_dir = copy_data_stages(base_run, tmp_path_factory.mktemp(name) / "run")
        result = cli_subprocess(*train_args(corpus, run_dir, *STEPS, *LAYOUTS[name]))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = run_dir
    return runs


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_tp2_and_pp2_train_and_loss_drops(straight, layout):
    out = straight[layout] / "train"
    job = json.loads((out / "job.json").read_text())
    assert job["train"]["parallel"]["tp"] * job["train"]["parallel"]["pp"] == 2
    done = summary(straight[layout])
    assert done["layout"]["dp"] == 1 and done["steps"] == 24 and done["tokens_seen"] == 24 * 2048
    assert done["eval_loss"] < done["first_loss"] - 0.3, done  # 6.95 -> 6.54 in 24 steps at TP=2
    # Megatron-LM's layout: iter_XXXXXXX dirs and the tracker naming the newest complete one
    ckpts = out / "checkpoints"
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text() == "24"
    assert sorted(p.name for p in ckpts.glob("iter_*")) == ["iter_0000016", "iter_0000024"]  # keep_checkpoints=2
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {"loss", "grad_norm", "learning_rate", "tokens_seen", "tokens_per_second",
            "tflops_per_device"} <= set(rows[3])
    assert "mfu" not in rows[3]  # no GPU, no peak: no made-up MFU


def test_layouts_agree_on_the_same_init_and_data(corpus, base_run, straight, tmp_path):
    """TP1 (x DP2), TP2, PP2, PP2 x VPP2, activation recompute and the plain (not distributed) optimizer
    start from one checkpoint (train.init) and see the same global batches: their first losses agree
    to float rounding."""
    init = straight["tp2"] / "train" / "checkpoints"
    losses = {}
    for name, layout in LAYOUTS.items():
        run_dir = copy_data_stages(base_run, tmp_path / name)
        result = cli_subprocess(*train_args(corpus, run_dir, f"train.init={init}", "train.max_steps=3",
                                            "train.save_every=3", "train.eval_every=3", *layout))
        assert result.returncode == 0, result.stderr[-3000:]
        losses[name] = log_losses(run_dir)
    assert losses["tp1"][1] < summary(straight["tp2"])["first_loss"] - 0.5  # it did start from the trained init
    for name in set(LAYOUTS) - {"tp1"}:
        for step in (1, 2, 3):
            assert losses[name][step] == pytest.approx(losses["tp1"][step], abs=1e-5), (name, step, losses)


def kill_after_checkpoint(args, run_dir, iteration):
    """Start the pipeline, SIGKILL it (driver, launcher, ranks) once checkpoint `iteration` is complete."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tracker = run_dir / "train.partial" / "checkpoints" / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if tracker.is_file() and int(tracker.read_text() or 0) >= iteration:
            break
        time.sleep(0.02)
    kill_tree(proc)  # the driver, the launcher and both ranks
    assert tracker.is_file() and not (run_dir / "train").exists()
    return int(tracker.read_text())


@pytest.mark.parametrize("before,after", [("tp2", "tp2"), ("tp2", "tp1"), ("pp2", "tp1")])
def test_kill_9_then_resume_at_the_same_or_another_layout(corpus, base_run, straight, tmp_path, before, after):
    """The killed run resumes from its last complete checkpoint, at the layout given on the rerun
    (train.parallel is not part of the stage's fingerprint), and continues the uninterrupted run:
    bit for bit at the same layout, to float rounding at another."""
    run_dir = copy_data_stages(base_run, tmp_path / "run")
    saved = kill_after_checkpoint(train_args(corpus, run_dir, *STEPS, *LAYOUTS[before]), run_dir, 8)
    logged_before_kill = len((run_dir / "train.partial" / "train_log.jsonl").read_text().splitlines())
    # how-only changes besides the layout: port, tracker, log interval, memory estimate
    how_only = ("launcher.master_port=29619", "train.tracker=swanlab", "train.logging_steps=2",
                "launcher.gpu_memory_gb=40")
    resumed = cli_subprocess(*train_args(corpus, run_dir, *STEPS, *LAYOUTS[after], *how_only))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    done = summary(run_dir)
    assert done["resumed_from"] == f"iter_{saved:07d}" and done["resumed_step"] == saved and done["steps"] == 24
    assert f"resuming from iter_{saved:07d}, step {saved} of 24" in resumed.stderr + resumed.stdout
    assert done["layout"]["tp"] == int(LAYOUTS[after][0][-1]) and done["layout"]["pp"] == int(LAYOUTS[after][1][-1])
    reference, losses = log_losses(straight[before]), log_losses(run_dir)
    assert set(range(1, saved + 1)) <= set(losses)
    resumed_rows = (run_dir / "train" / "train_log.jsonl").read_text().splitlines()[logged_before_kill:]
    train_rows = [json.loads(row) for row in resumed_rows if '"loss"' in row]  # evaluations are lines of their own
    assert [row["step"] for row in train_rows] == list(range(saved + 2, 25, 2))  # the new interval
    tolerance = 1e-6 if before == after else 1e-5  # measured: 0 and <= 3.6e-7
    for step in range(saved + 2, 25, 2):
        assert losses[step] == pytest.approx(reference[step], abs=tolerance), (step, losses[step], reference[step])


def test_an_identity_change_never_drops_checkpoints_and_restart_moves_them_aside(corpus, base_run, tmp_path):
    run_dir = copy_data_stages(base_run, tmp_path / "run")
    args = train_args(corpus, run_dir, *STEPS, *LAYOUTS["tp2"])
    changed_args = train_args(corpus, run_dir, *STEPS, *LAYOUTS["tp2"], "train.lr=2e-3")
    kill_after_checkpoint(args, run_dir, 8)
    held = {p.relative_to(run_dir / "train.partial"): p.stat().st_size
            for p in (run_dir / "train.partial").rglob("*") if p.is_file()}

    changed = cli_subprocess(*changed_args)
    assert changed.returncode == 2 and "config train.lr: 0.001 -> 0.002" in changed.stderr, changed.stderr[-3000:]
    assert "checkpoints/iter_0000008" in changed.stderr
    assert {p.relative_to(run_dir / "train.partial"): p.stat().st_size
            for p in (run_dir / "train.partial").rglob("*") if p.is_file()} == held

    restarted = cli_subprocess(*changed_args, "--restart", "train")
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    done = summary(run_dir)
    assert done["resumed_from"] is None and done["steps"] == 24
    (aside,) = run_dir.glob("train.restarted-*")
    assert (aside / "checkpoints" / "iter_0000008").is_dir() and (aside / "job.json").is_file()
    status = cli_subprocess("status", *fast_overrides(corpus, run_dir, *MEGATRON, *STEPS, "train.lr=2e-3"))
    assert "aside" in status.stdout and aside.name in status.stdout, status.stdout

    listed = cli_subprocess("clean", *fast_overrides(corpus, run_dir, *MEGATRON))
    assert f"would remove {aside}" in listed.stdout and aside.is_dir()
    removed = cli_subprocess("clean", "--yes", *fast_overrides(corpus, run_dir, *MEGATRON))
    assert removed.returncode == 0 and not aside.exists() and (run_dir / "train" / "checkpoints").is_dir()


@pytest.mark.parametrize("overrides,message", [
    (("train.parallel.tp=3", "launcher.nproc_per_node=3"),
     "train.parallel.tp: 4 attention heads (model.num_attention_heads) are not divisible by tp 3"),
    (("train.parallel.tp=4", "launcher.nproc_per_node=4", "model.num_attention_heads=8", "model.hidden_size=64"),
     "train.parallel.tp: 2 key/value heads (model.num_key_value_heads) are not divisible by tp 4"),
    (("train.parallel.tp=1", "train.parallel.pp=2", "model.num_layers=3"),
     "train.parallel.pp: 3 layers (model.num_layers) are not divisible by pp 2 x vpp 1 = 2 pipeline stages"),
    (("train.global_batch_tokens=2304",),
     "train.global_batch_tokens: 2304 tokens is not a multiple of micro_batch_size 4 x seq_len 128 x "
     "data-parallel size 1 = 512"),
    (("train.parallel.tp=2", "launcher.nproc_per_node=3"),
     "train.parallel: world size 3 (launcher.nnodes x launcher.nproc_per_node) is not divisible by tp 2 x pp 1"),
    (("train.parallel.tp=1", "train.parallel.sequence_parallel=true"),
     "train.parallel.sequence_parallel: sequence parallelism splits along tensor-parallel ranks: it needs tp > 1"),
    (("train.parallel.tp=1", "train.parallel.pp=2", "train.parallel.vpp=2", "model.num_layers=4",
      "train.global_batch_tokens=1536"),
     "train.parallel.vpp: the interleaved schedule needs the micro batches per step (3) to be a multiple of pp 2"),
    (("train.parallel.sequence_parallel=true",),  # this machine has neither Transformer Engine nor apex
     "train.parallel.sequence_parallel: needs Transformer Engine or apex norms"),
], ids=["heads", "kv_heads", "layers", "global_batch", "world", "sequence_parallel", "vpp_microbatches", "sp_norms"])
def test_bad_layouts_are_errors_naming_the_numbers_before_any_process_starts(corpus, run_copy, capsys, overrides,
                                                                            message):
    assert cli(*train_args(corpus, run_copy, *overrides)) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (run_copy / "train").exists()  # nothing published


@pytest.fixture
def run_copy(base_run, tmp_path):
    return copy_data_stages(base_run, tmp_path / "run")


@pytest.mark.parametrize("family,layout,overrides,keys", [
    ("qwen2", "tp2", ("model.tie_word_embeddings=true",), ["decoder.layers.self_attention.linear_qkv.bias"]),
    ("gpt2", "pp2", ("model.num_key_value_heads=null", "model.ffn_hidden_size=null", "model.tie_word_embeddings=true"),
     ["embedding.position_embeddings.weight", "decoder.layers.mlp.linear_fc1.bias"]),
    ("qwen3", "tp2", ("model=tiny_qwen3", "model.rope_scaling=llama3", "model.rope_scaling_factor=8",
                      "model.rope_original_max_position_embeddings=64", "model.tie_word_embeddings=true"),
     ["decoder.layers.self_attention.q_layernorm.weight", "decoder.layers.self_attention.k_layernorm.weight"]),
])
def test_qwen2_and_gpt2_families_train(corpus, run_copy, family, layout, overrides, keys):
    """Qwen2 (QKV bias, tied embeddings) at TP=2, GPT-2 (learned positions, LayerNorm and linear biases,
    embeddings tied across the two pipeline stages) at PP=2 and Qwen3 (q/k norms, head_dim 32 != hidden /
    heads, llama3 RoPE scaling) at TP=2: they train, and the checkpoint holds their tensors."""
    from megatron.core import dist_checkpointing

    result = cli_subprocess(*train_args(corpus, run_copy, f"model.family={family}", *overrides, *LAYOUTS[layout],
                                        "train.max_steps=6", "train.save_every=6", "train.eval_every=6"))
    assert result.returncode == 0, result.stderr[-3000:]
    done = summary(run_copy)
    assert done["eval_loss"] < done["first_loss"], done
    stored = dist_checkpointing.load_tensors_metadata(str(run_copy / "train" / "checkpoints" / "iter_0000006"))
    assert set(keys) <= set(stored), sorted(stored)
    assert ("output_layer.weight" in stored) is False  # tied: the output layer is the embedding
