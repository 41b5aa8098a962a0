"""The trainer box opened: train.hf_args / train.megatron_args checked by name before any stage runs,
train.recompute (and its old name train.parallel.recompute), the Adam settings and train.attention; which
of them are how-only (no fingerprint changes) and which are identity."""
import dataclasses

import pytest

from pipeline.config import HF_HOW_ARGS, MEGATRON_HOW_ARGS, compose, subtree
from pipeline.errors import ConfigError
from pipeline.runner import Runner
from pipeline.stages import STAGES
from pipeline.train import passthrough
from pipeline.train.job import TrainJob, TrainSettings
from pipeline.train.stage import check

from conftest import cli, fast_overrides

MEGATRON = ("experiment=tiny_cpu_megatron",)


@pytest.fixture(scope="module")
def megatron_fields():
    """Every field megatron_args may name (megatron-core imported once: it is slow to import)."""
    return set().union(*(passthrough.field_names(s) for s in passthrough.megatron_schemas().values()))


def checked(corpus, tmp_path, *overrides):
    """The config composed and the train stage's check run on it, as `pipeline run` does first."""
    cfg = compose(fast_overrides(corpus, tmp_path / "run", *overrides))
    check(cfg)
    return cfg


def test_an_unknown_hf_args_name_fails_the_run_before_any_stage_naming_the_nearest_field(corpus, tmp_path,
                                                                                          capsys):
    args = fast_overrides(corpus, tmp_path / "run", "+train.hf_args.lr_schedular_type=linear")
    assert cli("run", *args, "--dry-run") == 2
    err = capsys.readouterr().err
    assert "train.hf_args.lr_schedular_type: not a field of TrainingArguments" in err, err
    assert "did you mean train.hf_args.lr_scheduler_type?" in err
    assert not (tmp_path / "run" / "tokenizer").exists()


@pytest.mark.parametrize("override, message", [
    ("+train.hf_args.learning_rate=1e-3", "train.hf_args.learning_rate: set by the pipeline from train.lr"),
    ("+train.hf_args.gradient_checkpointing=true", "from train.recompute"),
    ("+train.hf_args.adam_beta2=0.95", "from train.adam_beta2"),
])
def test_hf_args_the_pipeline_sets_are_refused_naming_its_key(corpus, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        checked(corpus, tmp_path, override)


def test_megatron_args_names_are_checked_against_the_three_megatron_core_configs(corpus, tmp_path, megatron_fields):
    with pytest.raises(ConfigError, match=r"train.megatron_args.init_method_sdt: not a field of TransformerConfig "
                                          r"/ OptimizerConfig / DistributedDataParallelConfig.*init_method_std"):
        checked(corpus, tmp_path, *MEGATRON, "+train.megatron_args.init_method_sdt=0.01")
    with pytest.raises(ConfigError, match="train.megatron_args.lr: set by the pipeline from train.lr"):
        checked(corpus, tmp_path, *MEGATRON, "+train.megatron_args.lr=0.1")
    with pytest.raises(ConfigError, match="train.megatron_args.recompute_num_layers: only full recompute"):
        checked(corpus, tmp_path, *MEGATRON, "+train.megatron_args.recompute_num_layers=2")
    # one field of each config passes
    checked(corpus, tmp_path, *MEGATRON, "train.recompute=full", "+train.megatron_args.recompute_num_layers=2",
            "+train.megatron_args.init_method_std=0.01", "+train.megatron_args.decoupled_weight_decay=false",
            "+train.megatron_args.grad_reduce_in_fp32=false")


def test_the_tables_name_real_fields(megatron_fields):
    """Every how-only and pipeline-owned name is a field of the trainer's config; the TrainingArguments the
    pipeline passes are its owned names plus the few defaults hf_args may replace."""
    from transformers import TrainingArguments

    from pipeline.train.hf_backend import pipeline_arguments

    hf_fields = passthrough.field_names(TrainingArguments)
    assert set(HF_HOW_ARGS) | set(passthrough.HF_OWNED) <= hf_fields
    assert set(MEGATRON_HOW_ARGS) | set(passthrough.MEGATRON_OWNED) <= megatron_fields
    passed = set(pipeline_arguments(TrainJob(work_dir="w"), "fp32", False, []))
    assert passed - set(passthrough.HF_OWNED) == {"lr_scheduler_type", "lr_scheduler_kwargs", "dataloader_num_workers",
                                                   "ddp_find_unused_parameters", "disable_tqdm"}


def test_each_backend_refuses_the_other_backends_args(corpus, tmp_path):
    with pytest.raises(ConfigError, match="train.hf_args: only the hf backend reads it.*use train.megatron_args"):
        compose(fast_overrides(corpus, tmp_path, *MEGATRON, "+train.hf_args.torch_compile=true"))
    with pytest.raises(ConfigError, match="train.megatron_args: only the megatron backend reads it"):
        compose(fast_overrides(corpus, tmp_path, "+train.megatron_args.hidden_dropout=0.1"))


def test_recompute_rules_and_its_old_name(corpus, tmp_path):
    with pytest.raises(ConfigError, match="train.recompute: the hf backend recomputes whole layers only"):
        compose(fast_overrides(corpus, tmp_path, "train.recompute=selective"))
    with pytest.raises(ConfigError, match="train.recompute: full but its old name train.parallel.recompute says "
                                          "selective"):
        compose(fast_overrides(corpus, tmp_path, *MEGATRON, "train.recompute=full",
                               "train.parallel.recompute=selective"))
    for overrides in (("train.parallel.recompute=selective",), ("train.recompute=selective",)):
        cfg = compose(fast_overrides(corpus, tmp_path, *MEGATRON, *overrides))
        assert TrainSettings.from_dict(subtree(cfg, "train")).recompute == "selective", overrides
    # a job.json written before train.recompute existed keeps its recompute
    assert TrainSettings.from_dict({"backend": "megatron", "parallel": {"recompute": "full"}}).recompute == "full"
    with pytest.raises(ConfigError, match=r"train.adam_beta2: must be in \[0, 1\)"):
        compose(fast_overrides(corpus, tmp_path, "train.adam_beta2=1.5"))


def test_adam_defaults_are_each_backends_old_ones():
    assert TrainSettings(backend="hf").adam == (0.9, 0.999, 1e-8)  # TrainingArguments' defaults
    assert TrainSettings(backend="megatron").adam == (0.9, 0.95, 1e-8)  # the seeds' Megatron flags
    assert TrainSettings(backend="megatron", adam_beta2=0.98, adam_eps=1e-6).adam == (0.9, 0.98, 1e-6)


def test_attention_flash_is_refused_where_it_cannot_run(corpus, tmp_path):
    import importlib.util

    import torch

    with pytest.raises(ConfigError, match="flash_attention_2 keeps documents apart .* only in a micro batch of one "
                                          "sequence, not 4"):
        checked(corpus, tmp_path, "train.attention=flash")  # tiny_cpu: 4 sequences a micro batch
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn"):
        pytest.skip("flash attention can run here")
    with pytest.raises(ConfigError, match="train.attention: flash needs a GPU and flash_attn"):
        checked(corpus, tmp_path, "train.attention=flash", "train.micro_batch_size=1")
    checked(corpus, tmp_path, "train.attention=eager")


def train_fingerprint(corpus, tmp_path, *overrides) -> str:
    plan = Runner(compose(fast_overrides(corpus, tmp_path / "run", *overrides)), STAGES).plan()
    return next(i.fingerprint for i in plan if i.stage.name == "train")


def test_how_only_and_identity_keys(corpus, tmp_path):
    """Recompute, the attention kernel and the how-only hf_args names (loading, compiling, logging) leave the
    train fingerprint alone; Adam's betas and any other hf_args entry change it. At their defaults the new
    keys hash nothing, so runs from before them stay finished."""
    base = train_fingerprint(corpus, tmp_path)
    same = ("train.recompute=full", "train.attention=eager", "+train.hf_args.dataloader_num_workers=2",
            "+train.hf_args.torch_compile=true", "train.adam_beta1=0.9", "train.adam_eps=1e-8")
    assert train_fingerprint(corpus, tmp_path, *same) == base
    for override in ("train.adam_beta2=0.98", "train.adam_beta1=0.8", "+train.hf_args.lr_scheduler_type=linear"):
        assert train_fingerprint(corpus, tmp_path, override) != base, override
    megatron = train_fingerprint(corpus, tmp_path, *MEGATRON)
    assert train_fingerprint(corpus, tmp_path, *MEGATRON, "train.recompute=full",
                             "+train.megatron_args.recompute_num_layers=2",
                             "+train.megatron_args.bias_activation_fusion=true") == megatron
    assert train_fingerprint(corpus, tmp_path, *MEGATRON, "+train.megatron_args.init_method_std=0.01") != megatron
    parts = Runner(compose(fast_overrides(corpus, tmp_path / "run")), STAGES).plan()
    hashed = next(i for i in parts if i.stage.name == "train").parts["config"]["train"]
    assert not {"hf_args", "megatron_args", "adam_beta1", "adam_beta2", "adam_eps", "recompute",
                "attention"} & set(hashed)


def test_hf_args_reach_training_arguments_and_replace_the_schedule():
    from pipeline.train.hf_backend import training_arguments

    train = TrainSettings(hf_args={"lr_scheduler_type": "linear", "optim": "adamw_torch"}, adam_beta2=0.98,
                          recompute="full")
    args = training_arguments(TrainJob(train=train, work_dir="w"), "fp32", False, [])
    assert (args.lr_scheduler_type.value, args.optim.value, args.adam_beta2) == ("linear", "adamw_torch", 0.98)
    assert not args.lr_scheduler_kwargs  # the cosine's min_lr_rate went with the schedule it belongs to
    assert args.gradient_checkpointing and args.activation_checkpointing_kwargs == {"use_reentrant": False}
    plain = training_arguments(TrainJob(work_dir="w"), "fp32", False, [])
    assert plain.lr_scheduler_type.value == "cosine_with_min_lr" and not plain.gradient_checkpointing
    assert dataclasses.asdict(train)["hf_args"] == train.hf_args  # job.json keeps them as given
