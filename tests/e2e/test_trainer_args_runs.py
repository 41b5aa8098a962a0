"""The trainer box opened, through real runs: train.recompute=full (gradient checkpointing) trains to the
losses of no recompute, train.adam_beta2 and train.hf_args reach the Trainer's TrainingArguments, eager
attention keeps document masking, and on megatron train.recompute and train.megatron_args reach
megatron-core."""
import dataclasses
import json
import math

import pytest
import torch

from conftest import cli, copy_data_stages, fast_overrides, log_losses
from test_document_mask import DOC_A, docs, hf_job  # noqa: F401 (docs: its two-document fixture)

TRAIN = ("--only", "import,train")
# no evaluation or checkpoint inside the 4 steps (the closing evaluation and the model save remain): time
ONE_RANK = ("train.tracker=none", "train.logging_steps=1", "launcher.nproc_per_node=1", "train.max_steps=4",
            "train.eval_every=100", "train.save_every=100")
# the same in both runs, so their losses must agree: what differs is recompute only
PASSED = ("train.adam_beta2=0.98", "+train.hf_args.lr_scheduler_type=linear", "+train.hf_args.optim=adamw_torch")


@pytest.fixture(scope="module")
def hf_runs(corpus, base_run, tmp_path_factory):
    runs = {}
    for recompute in ("none", "full"):
        run_dir = copy_data_stages(base_run, tmp_path_factory.mktemp(recompute) / "run")
        assert cli("run", *fast_overrides(corpus, run_dir, *ONE_RANK, *PASSED, f"train.recompute={recompute}"),
                   *TRAIN) == 0
        runs[recompute] = run_dir
    return runs


def saved_args(run_dir):
    """The TrainingArguments the Trainer saved beside the model (our own file: not untrusted)."""
    return torch.load(run_dir / "train" / "hf" / "training_args.bin", weights_only=False)


def test_gradient_checkpointing_trains_to_the_losses_of_no_recompute(hf_runs):
    plain, recomputed = (log_losses(hf_runs[r]) for r in ("none", "full"))
    assert sorted(plain) == [1, 2, 3, 4]
    for step in plain:
        assert recomputed[step] == pytest.approx(plain[step], abs=1e-5), (step, plain, recomputed)
    assert plain[4] < plain[1]  # it did train
    assert [saved_args(hf_runs[r]).gradient_checkpointing for r in ("none", "full")] == [False, True]


def test_adam_and_hf_args_reach_the_trainer(hf_runs):
    args = saved_args(hf_runs["full"])
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (0.9, 0.98, 1e-8)
    assert (args.lr_scheduler_type.value, args.optim.value) == ("linear", "adamw_torch")
    job = json.loads((hf_runs["full"] / "train" / "job.json").read_text())
    assert job["train"]["hf_args"] == {"lr_scheduler_type": "linear", "optim": "adamw_torch"}
    assert job["train"]["recompute"] == "full"
    # the schedule the run used is linear after its warmup: equal decrements (a cosine's are not)
    rows = [json.loads(line) for line in (hf_runs["full"] / "train" / "train_log.jsonl").read_text().splitlines()]
    lrs = [r["learning_rate"] for r in rows if "learning_rate" in r][1:]
    assert len(lrs) == 3 and lrs[0] > lrs[1] > lrs[2], lrs
    assert lrs[0] - lrs[1] == pytest.approx(lrs[1] - lrs[2], rel=1e-6), lrs


def test_eager_attention_keeps_document_masking(docs):  # noqa: F811 (the fixture imported above)
    """A block of doc A + EOD + doc B gives B the logits it has alone under eager attention too, as under
    sdpa (tests/e2e/test_document_mask.py, whose two documents these are)."""
    from pipeline.train.hf_backend import DocumentBlocks, build_model, collate

    prefix, b = docs
    job = hf_job(prefix, True)
    job = dataclasses.replace(job, train=dataclasses.replace(job.train, attention="eager"))
    model = build_model(job).eval()
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        alone = model(input_ids=b[None]).logits[0]
        packed = model(**collate([DocumentBlocks(prefix, job)[0]])).logits[0, DOC_A + 1:]
    assert (packed - alone).abs().max() < 1e-5


def test_megatron_recompute_and_megatron_args_reach_megatron_core(corpus, base_run, tmp_path):
    """One rank, TP=1: train.recompute=full with megatron_args' grouping (how-only) and init_method_std
    (identity). A near-zero init makes every logit ~0, so the first loss is ln(padded vocab) to 1e-4; the
    default init (0.02) starts about 0.02 above it (6.95 vs ln 1024 = 6.93, tests/e2e/test_train_megatron.py).
    train.adam_beta2 reaches megatron-core's optimizer."""
    run_dir = copy_data_stages(base_run, tmp_path / "run")
    overrides = fast_overrides(corpus, run_dir, "experiment=tiny_cpu_megatron", "train.parallel.tp=1",
                               *ONE_RANK[:3], "train.max_steps=2", "train.eval_every=2", "train.save_every=2",
                               "train.recompute=full", "+train.megatron_args.recompute_num_layers=2",
                               "+train.megatron_args.init_method_std=1e-6", "train.adam_beta2=0.98")
    assert cli("run", *overrides, *TRAIN) == 0
    from pipeline.train.job import TrainJob
    from pipeline.train.mcore.model import transformer_config

    job = TrainJob.load(run_dir / "train" / "job.json")
    assert job.train.adam == (0.9, 0.98, 1e-8)
    config = transformer_config(job, "fp32")  # as megatron_entry.py builds it from the same job.json
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == \
        ("full", "uniform", 2)
    assert config.init_method_std == 1e-6
    assert log_losses(run_dir)[1] == pytest.approx(math.log(job.padded_vocab_size), abs=1e-4)
    # the Adam the run stepped with, as its checkpoint stores it (our own file: not untrusted)
    common = torch.load(run_dir / "train" / "checkpoints" / "iter_0000002" / "common.pt", weights_only=False)
    assert {tuple(g["betas"]) for g in common["optimizer"]["optimizer"]["param_groups"]} == {(0.9, 0.98)}
