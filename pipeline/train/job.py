"""The train job: what the train stage hands every rank, as `<work_dir>/job.json`.

The stage builds a `TrainJob` (stage.py), writes it once, and every rank of either backend loads it
(`TrainJob.load`). The JSON keys are the ones job.json has always had, so the job of an existing run
reads as before: the resolved `model` and `train` settings, data and tokenizer paths, the fingerprints a
checkpoint must match to be resumed, and the backend's own part (hf: the DeepSpeed config; megatron:
the step counts and the padded vocabulary counted by the stage, as Megatron-LM counts them).
`model` stays the plain dict pipeline/models/ reads; `checkpoint_args` is stored in every Megatron
checkpoint as it is.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from pipeline.config import ParallelConfig, TrainConfig, recompute_of


def _defaults(schema: type) -> Dict[str, Any]:
    """The schema's (pipeline/config.py) field defaults, enums as their values: what a key missing from
    an older job.json stands for."""
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(value):
            continue  # nested: filled by its own type
        out[f.name] = value.value if isinstance(value, enum.Enum) else value
    return out


# the defaults are the config schema's: one place says what an unset setting means
_TRAIN, _PARALLEL = _defaults(TrainConfig), _defaults(ParallelConfig)
# train.adam_beta2 unset: what each backend used before the key existed (TrainingArguments' default; the
# seeds' Megatron flags)
ADAM_BETA2 = {"hf": 0.999, "megatron": 0.95}


def _pick(cls: type, data: Mapping[str, Any]) -> Dict[str, Any]:
    """The fields of `cls` in data; a key an older job.json lacks keeps its default (the schema's)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass(frozen=True)
class Parallel:
    """train.parallel: the megatron backend's TP/PP/VPP layout."""

    tp: int = _PARALLEL["tp"]
    pp: int = _PARALLEL["pp"]
    vpp: Optional[int] = _PARALLEL["vpp"]
    sequence_parallel: bool = _PARALLEL["sequence_parallel"]
    distributed_optimizer: bool = _PARALLEL["distributed_optimizer"]
    recompute: str = _PARALLEL["recompute"]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Parallel":
        return cls(**_pick(cls, data))


@dataclass(frozen=True)
class TrainSettings:
    """The resolved `train.*` settings (pipeline/config.py TrainConfig), in its field order: job.json's
    `train` as the stage wrote it."""

    backend: str = _TRAIN["backend"]
    init: Optional[str] = _TRAIN["init"]
    seq_len: int = _TRAIN["seq_len"]
    global_batch_tokens: int = _TRAIN["global_batch_tokens"]
    micro_batch_size: int = _TRAIN["micro_batch_size"]
    epochs: float = _TRAIN["epochs"]
    max_steps: Optional[int] = _TRAIN["max_steps"]
    lr: float = _TRAIN["lr"]
    min_lr_ratio: float = _TRAIN["min_lr_ratio"]
    warmup_ratio: float = _TRAIN["warmup_ratio"]
    weight_decay: float = _TRAIN["weight_decay"]
    grad_clip: float = _TRAIN["grad_clip"]
    eval_every: float = _TRAIN["eval_every"]
    save_every: float = _TRAIN["save_every"]
    keep_checkpoints: int = _TRAIN["keep_checkpoints"]
    zero_stage: int = _TRAIN["zero_stage"]
    offload: bool = _TRAIN["offload"]
    precision: str = _TRAIN["precision"]
    tracker: str = _TRAIN["tracker"]
    tracker_mode: str = _TRAIN["tracker_mode"]
    logging_steps: int = _TRAIN["logging_steps"]
    seed: int = _TRAIN["seed"]
    parallel: Parallel = field(default_factory=Parallel)
    resume_from: Optional[str] = _TRAIN["resume_from"]
    make_vocab_size_divisible_by: int = _TRAIN["make_vocab_size_divisible_by"]
    document_mask: bool = _TRAIN["document_mask"]
    eod_mask_loss: bool = _TRAIN["eod_mask_loss"]
    peak_tflops: Optional[float] = _TRAIN["peak_tflops"]
    sample_prompts: List[str] = field(default_factory=lambda: list(_TRAIN["sample_prompts"]))
    sample_tokens: int = _TRAIN["sample_tokens"]
    recompute: str = _TRAIN["recompute"]  # resolved: train.recompute, else train.parallel.recompute
    attention: str = _TRAIN["attention"]
    adam_beta1: float = _TRAIN["adam_beta1"]
    adam_beta2: Optional[float] = _TRAIN["adam_beta2"]
    adam_eps: float = _TRAIN["adam_eps"]
    hf_args: Dict[str, Any] = field(default_factory=dict)
    megatron_args: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainSettings":
        values = _pick(cls, data)
        values["parallel"] = Parallel.from_dict(data.get("parallel") or {})
        values["recompute"] = recompute_of(data)
        return cls(**values)

    @property
    def adam(self) -> Tuple[float, float, float]:
        """(beta1, beta2, eps) of this backend's Adam."""
        beta2 = ADAM_BETA2[self.backend] if self.adam_beta2 is None else self.adam_beta2
        return self.adam_beta1, beta2, self.adam_eps

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# the megatron backend's part of job.json, in the order the stage has always written it
MEGATRON_KEYS = ("global_batch_sequences", "total_steps", "warmup_steps", "valid_steps", "eval_every_steps",
                 "save_every_steps", "padded_vocab_size", "checkpoint_args")


@dataclass(frozen=True)
class TrainJob:
    name: str = ""
    work_dir: str = ""
    model: Dict[str, Any] = field(default_factory=dict)  # the resolved model.* (megatron with an init: the init's)
    train: TrainSettings = field(default_factory=TrainSettings)
    init: Optional[str] = None  # the checkpoint the weights start from (megatron: an imported HF init's copy)
    tokenizer_dir: str = ""
    train_prefix: str = ""
    valid_prefix: str = ""
    # per-source validation (pipeline/data/mix.py): the stream of each valid token's source index, and the
    # sources it indexes; "" and [] for a mix without them
    valid_source_ids: str = ""
    valid_sources: List[str] = field(default_factory=list)
    vocab_size: int = 0
    eod_id: int = 0
    grad_accumulation: int = 1
    global_batch_tokens: int = 0
    # a checkpoint may only be resumed by a run on the same data and the same model
    data_fingerprint: str = ""
    model_fingerprint: str = ""
    # hf
    deepspeed: Optional[Dict[str, Any]] = None
    # megatron: counted by the stage (train/stage.py megatron_job)
    global_batch_sequences: int = 0
    total_steps: int = 0
    warmup_steps: int = 0
    valid_steps: int = 0
    eval_every_steps: int = 1
    save_every_steps: int = 1
    padded_vocab_size: int = 0
    checkpoint_args: Dict[str, Any] = field(default_factory=dict)

    @property
    def identity(self) -> Dict[str, str]:
        """What a checkpoint records and a resume must match (train/checkpoints.py check_identity)."""
        return {"data_fingerprint": self.data_fingerprint, "model_fingerprint": self.model_fingerprint}

    @property
    def out(self) -> Path:
        return Path(self.work_dir)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainJob":
        values = _pick(cls, data)
        values["train"] = TrainSettings.from_dict(data.get("train") or {})
        return cls(**values)

    @classmethod
    def of(cls, job: Union["TrainJob", Mapping[str, Any]]) -> "TrainJob":
        """A TrainJob, or a job.json dict read by a tool of its own (bench/, tests)."""
        return job if isinstance(job, TrainJob) else cls.from_dict(job)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "TrainJob":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> Dict[str, Any]:
        """job.json's content: the common keys, then the backend's."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "deepspeed" and f.name not in MEGATRON_KEYS}
        out["train"] = self.train.to_dict()
        if self.train.backend == "hf":
            out["deepspeed"] = self.deepspeed
        else:
            out.update({k: getattr(self, k) for k in MEGATRON_KEYS})
        return out

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")  # other nodes read it as soon as it exists
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, path)
