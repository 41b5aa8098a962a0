"""The structured config schema and how a config is composed.

Every group under `configs/` merges into these dataclasses, so a misspelt key or a wrong type is an
OmegaConf error that names the full key (`data.sources.web.text_feld`), raised before any stage runs.
Cross-field rules (weights name existing sources, a budget stop needs a budget, ...) live in
`validate()`, each error naming its key.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import enum
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import MISSING, DictConfig, OmegaConf

from pipeline.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


# What vs how. A field marked `how` changes how a stage runs (processes, ports, trackers, logging,
# parallel layout, check thresholds), never what it writes, so it is left out of every fingerprint:
# changing it resumes a partial stage and keeps a finished one. Every other field is identity.
HOW = {"how": True}


def how(default: Any = None, *, factory: Any = None) -> Any:
    """A how-only field (see HOW)."""
    if factory is not None:
        return field(default_factory=factory, metadata=HOW)
    return field(default=default, metadata=HOW)


# Added later. An identity field added after runs exist takes a default that computes what those runs
# computed, and at that default it is left out of the fingerprint: upgrading the pipeline never makes a
# finished stage stale (a finished training is never redone for a key it did not have). Any other value
# is identity as usual.
ADDED = {"added": True}


def added(default: Any = None, *, factory: Any = None, how_names: Tuple[str, ...] = ()) -> Any:
    """An identity field added after the first runs (see ADDED); `default` must reproduce them. A dict
    field may name entries that are how-only (`how_names`): those stay out of the fingerprint."""
    metadata = {**ADDED, "how_names": how_names} if how_names else ADDED
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


class BadRecordPolicy(str, enum.Enum):
    error = "error"  # stop with file:line and the reason
    skip = "skip"  # drop it, count it in the report
    quarantine = "quarantine"  # drop it, write it to <source>.rejects.jsonl


class TextUnit(str, enum.Enum):
    file = "file"
    line = "line"
    paragraph = "paragraph"


class Engine(str, enum.Enum):
    auto = "auto"
    hf = "hf"
    fastokens = "fastokens"
    gigatoken = "gigatoken"


class MixBy(str, enum.Enum):
    tokens = "tokens"
    documents = "documents"


class Stopping(str, enum.Enum):
    first_exhausted = "first_exhausted"
    all_exhausted = "all_exhausted"
    budget = "budget"


@dataclass
class SourceConfig:
    """One text source: local files (jsonl, jsonl.gz, json, parquet, txt; globs allowed) or an HF dataset."""

    path: str = MISSING  # file, glob, directory, or `hf://<dataset name>` for a streamed HF dataset
    text_field: str = "text"  # the record field holding the document text (jsonl/json/parquet/hf)
    format: Optional[str] = None  # jsonl|json|parquet|txt; None = from the file suffix
    text_unit: TextUnit = TextUnit.file  # txt files only: one document per file, line or blank-line paragraph
    hf_name: Optional[str] = None  # HF dataset config name (`load_dataset(path, name)`)
    hf_split: str = "train"
    hf_revision: Optional[str] = None  # pin a dataset revision so reruns see the same data
    hf_data_files: Optional[List[str]] = None
    max_tokens: Optional[int] = None  # token budget: stop this source after this many tokens (EOD included)
    on_bad_record: BadRecordPolicy = BadRecordPolicy.error


@dataclass
class TokenizeConfig:
    # worker processes (executor=ray, ray_address=local: Ray CPUs); output bytes do not depend on it
    workers: int = how(2)
    executor: str = how("local")  # local (worker processes here) | ray (Ray tasks, one per shard); same output bytes
    ray_address: str = how("local")  # executor=ray: local (an embedded Ray on this machine), auto, host:port, ray://...
    engine: Engine = Engine.auto  # auto = fastest engine verified to give HF's ids on this input
    shard_bytes: int = 8 * 1024 * 1024  # input bytes per shard: the unit of parallelism and resume
    # (output bytes do not depend on it; 8 MiB keeps 2 workers busy on a 50 MB file, and is ~125k
    # shard markers per TB)
    batch_docs: int = 512  # documents per encode call
    append_eod: bool = True  # EOD after every document (Megatron's --append-eod)
    add_special_tokens: bool = True  # as HF `tokenizer(text)` and Megatron's preprocess_data.py do
    split_chars: int = 1_000_000  # documents longer than this are encoded in pieces cut at line starts
    verify_docs: int = how(256)  # documents per source (at most 512 KiB of each) to verify a fast engine against HF


@dataclass
class MixConfig:
    weights: Dict[str, float] = field(default_factory=dict)  # source name -> target share (normalised)
    by: MixBy = MixBy.tokens  # tokens = deficit rule (token-exact); documents = HF interleave_datasets
    stopping: Stopping = Stopping.first_exhausted
    total_tokens: Optional[int] = None  # the budget for stopping=budget (train + valid)
    valid_fraction: float = 0.01  # share of the mixed tokens held out for validation
    valid_tokens: Optional[int] = None  # exact validation size in tokens; overrides valid_fraction
    seed: int = 42  # drives `by: documents` sampling


@dataclass
class DataConfig:
    sources: Dict[str, SourceConfig] = field(default_factory=dict)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    mix: MixConfig = field(default_factory=MixConfig)


@dataclass
class TokenizerConfig:
    """Either `pretrained` (local dir or hub name) or a byte-level BPE trained on a sample of the sources."""

    pretrained: Optional[str] = None
    trust_remote_code: bool = False
    vocab_size: int = 8192
    min_frequency: int = 2
    eod_token: str = "<|endoftext|>"  # end-of-document token, always in the vocabulary
    special_tokens: List[str] = field(default_factory=list)  # extra special tokens, after the EOD token
    sample_docs_per_source: int = 2000  # BPE training sample: first N documents of each source
    sample_bytes_per_source: int = 8 * 1024 * 1024  # ... and at most this many bytes of each


class Tracker(str, enum.Enum):
    swanlab = "swanlab"
    wandb = "wandb"
    tensorboard = "tensorboard"
    none = "none"


@dataclass
class ModelConfig:
    """Model shape, as an HF config. `tiny_llama` is the CPU debug flavour of every experiment."""

    family: str = "llama"  # a family of pipeline/models/ (llama | qwen2 | qwen3 | gpt2), HF's model_type
    vocab_size: Optional[int] = None  # None = len(tokenizer); a larger value pads the embedding
    hidden_size: int = MISSING
    num_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_key_value_heads: Optional[int] = None  # None = num_attention_heads (no GQA)
    ffn_hidden_size: Optional[int] = None  # None = the family's default (4 x hidden for gpt2)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    # added later (see ADDED): at these defaults, a model as before them
    head_dim: Optional[int] = added(None)  # per attention head; None = hidden_size / num_attention_heads
    rope_scaling: str = added("none")  # none | linear | llama3 (HF's rope_type)
    rope_scaling_factor: float = added(1.0)
    rope_low_freq_factor: float = added(1.0)  # llama3
    rope_high_freq_factor: float = added(4.0)  # llama3
    rope_original_max_position_embeddings: Optional[int] = added(None)  # llama3: the pretraining context
    qk_norm: bool = added(False)  # an RMSNorm on each head's queries and keys (Qwen3)


class Recompute(str, enum.Enum):
    none = "none"
    selective = "selective"  # recompute the attention core in backward (cheap, saves the s^2 activations)
    full = "full"  # recompute whole layers (uniform, one layer per checkpoint)


@dataclass
class ParallelConfig:
    """How the megatron backend lays the model over its ranks. Not what it computes: a run resumes
    at another layout, so these keys stay out of the train stage's fingerprint."""

    tp: int = 1  # tensor-parallel size: attention heads, key/value heads and the MLP split across tp ranks
    pp: int = 1  # pipeline stages: the layers split evenly across pp ranks
    vpp: Optional[int] = None  # virtual stages per pipeline rank (interleaved schedule); needs pp > 1
    sequence_parallel: bool = False  # shard norm/dropout activations along the sequence; needs tp > 1
    distributed_optimizer: bool = True  # shard fp32 master weights and Adam state across data-parallel ranks
    recompute: Recompute = Recompute.none  # the old name of train.recompute, still read (recompute_of)


class Attention(str, enum.Enum):
    sdpa = "sdpa"  # hf: torch's scaled_dot_product_attention; megatron: megatron-core's auto
    eager = "eager"  # hf: transformers' eager attention; megatron: unfused
    flash = "flash"  # hf: flash_attention_2; megatron: Transformer Engine's flash backend (GPU + flash-attn)


# train.hf_args / train.megatron_args entries that only change how the trainer runs (loading, logging,
# communication, compiling, fused kernels, the recompute grouping), never the math: how-only. Every other
# entry is identity.
HF_HOW_ARGS = ("dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
               "dataloader_prefetch_factor", "dataloader_multiprocessing_context", "logging_first_step",
               "logging_nan_inf_filter", "include_num_input_tokens_seen", "disable_tqdm", "skip_memory_metrics",
               "ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph",
               "ddp_backend", "ddp_timeout", "torch_compile", "torch_compile_backend", "torch_compile_mode",
               "save_on_each_node")
MEGATRON_HOW_ARGS = ("overlap_grad_reduce", "overlap_param_gather", "bucket_size", "bias_activation_fusion",
                     "masked_softmax_fusion", "bias_dropout_fusion", "apply_rope_fusion", "persist_layer_norm",
                     "gradient_accumulation_fusion", "recompute_method", "recompute_num_layers")


@dataclass
class TrainConfig:
    """Training settings; defaults follow the seeds' continued-pretraining table."""

    backend: str = "hf"  # hf (Trainer + DeepSpeed) | megatron (megatron-core TP/PP)
    init: Optional[str] = None  # checkpoint to continue pretraining from; None = from scratch. hf: an HF
    # checkpoint (dir or hub name); megatron: a Megatron torch_dist checkpoint dir (its weights only)
    seq_len: int = 4096
    global_batch_tokens: int = 2 * 1024 * 1024  # tokens per optimizer step, across all ranks
    micro_batch_size: int = 1  # sequences per rank per forward; accumulation = global / (micro x seq x world)
    epochs: float = 1.0
    max_steps: Optional[int] = None  # overrides epochs
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr x this (3e-4 -> 3e-5)
    warmup_ratio: float = 0.02
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: float = 0.1  # < 1: fraction of the run's steps; >= 1: steps
    save_every: float = 0.1  # same; checkpoints also serve resume
    keep_checkpoints: int = how(2)  # newest checkpoints kept (the best by eval loss is kept too)
    zero_stage: int = 2  # hf: DeepSpeed ZeRO stage 0-3 (configs/deepspeed/zero<N>.json)
    offload: bool = False  # ZeRO optimizer (and, at stage 3, parameter) offload to CPU
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    tracker: Tracker = how(Tracker.swanlab)
    tracker_mode: str = how("local")  # swanlab: local (offline, `swanlab watch <dir>`) | cloud
    logging_steps: int = how(1)
    seed: int = 42
    parallel: ParallelConfig = how(factory=ParallelConfig)  # megatron: TP/PP/VPP/SP layout
    resume_from: Optional[str] = how(None)  # a checkpoint to resume from instead of the newest complete one: hf
    # a checkpoint-<step> dir, megatron an iter_<step> dir (or a checkpoints dir with its tracker file)
    make_vocab_size_divisible_by: int = 128  # megatron: embedding rows padded to a multiple of this x tp
    # no attention across the documents packed in a block, positions restarting after each EOD (Megatron-LM's
    # reset_attention_mask + reset_position_ids); true changes what older runs trained, so it is plain identity
    document_mask: bool = True
    eod_mask_loss: bool = added(False)  # no loss where the input is EOD (predicting the next document's start)
    peak_tflops: Optional[float] = how(None)  # one device's dense bf16 peak, for MFU; None = by GPU name
    # at each evaluation, greedy continuations of these prompts go to <train>/samples.jsonl and the tracker
    # (hf backend); [] = none
    sample_prompts: List[str] = how(factory=lambda: ["The", "def "])
    sample_tokens: int = how(16)  # new tokens per sample
    # activation recompute in backward (same math, less memory): hf full = gradient checkpointing (whole
    # layers); megatron selective (the attention core) or full (uniform, one layer per checkpoint)
    recompute: Recompute = how(Recompute.none)
    attention: Attention = how(Attention.sdpa)  # the attention kernel: same math (see Attention)
    adam_beta1: float = added(0.9)
    adam_beta2: Optional[float] = added(None)  # None = the backend's own: hf 0.999 (TrainingArguments), megatron 0.95
    adam_eps: float = added(1e-8)
    # more trainer settings by name, checked by the train stage (pipeline/train/passthrough.py)
    hf_args: Dict[str, Any] = added(factory=dict, how_names=HF_HOW_ARGS)  # hf: TrainingArguments fields
    # megatron: TransformerConfig, OptimizerConfig or DistributedDataParallelConfig fields
    megatron_args: Dict[str, Any] = added(factory=dict, how_names=MEGATRON_HOW_ARGS)


@dataclass
class LauncherConfig:
    """How the train stage starts its ranks (pipeline/launch.py)."""

    name: str = "local"  # local | torchrun | deepspeed | slurm
    nnodes: int = 1
    nproc_per_node: int = 1  # processes (GPUs) per node; on CPU, gloo processes
    rdzv_endpoint: Optional[str] = None  # torchrun: node 0's host:port, the same on every node; slurm: optional
    rdzv_id: str = "pipeline"  # torchrun: the same on every node of one launch
    node_rank: Optional[int] = None  # torchrun: this node; unset = $NODE_RANK, $SLURM_NODEID or $GROUP_RANK, else 0
    join_timeout: int = 7200  # torchrun, nodes > 0: seconds to wait for node 0 to reach the train stage
    hostfile: Optional[str] = None  # deepspeed: "<host> slots=<n>" per line
    master_addr: Optional[str] = None  # deepspeed with a hostfile: default the first host
    master_port: int = 29500  # deepspeed with a hostfile, and slurm's rendezvous
    gpu_memory_gb: float = 80.0  # the dry-run's memory estimate warns above 90% of this


@dataclass
class ExportConfig:
    """After training: an HF dir always (export/hf), a Megatron torch_dist copy on request. Each is
    checked by logits against what it was made from."""

    megatron: bool = False  # also write export/megatron (torch_dist: loads at any TP/PP)
    tp: int = 1  # the Megatron copy's embedding is padded for this TP (make_vocab_size_divisible_by x tp)
    make_vocab_size_divisible_by: int = 128
    dtype: Optional[str] = None  # fp32 | bf16 | fp16; None = as trained
    tolerance: float = how(1e-4)  # max |logit difference| allowed by the check; raise it for bf16/fp16 exports


@dataclass
class Config:
    name: str = MISSING  # experiment name; the default run dir is runs/<name>
    run_dir: Optional[str] = None  # where stages write; None = runs/<name> under the current directory
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launcher: LauncherConfig = how(factory=LauncherConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def how_keys(schema: Optional[type] = None, prefix: str = "") -> List[str]:
    """Dotted keys of the how-only fields of the schema; `*` stands for any key of a dict field."""
    schema = schema or Config
    hints = typing.get_type_hints(schema)
    keys: List[str] = []
    for f in dataclasses.fields(schema):
        key, kind = f"{prefix}{f.name}", hints[f.name]
        if f.metadata.get("how"):
            keys.append(key)
        elif f.metadata.get("how_names"):
            keys += [f"{key}.{name}" for name in f.metadata["how_names"]]
        elif dataclasses.is_dataclass(kind):
            keys += how_keys(kind, key + ".")
        elif typing.get_origin(kind) is dict and dataclasses.is_dataclass(typing.get_args(kind)[1]):
            keys += how_keys(typing.get_args(kind)[1], key + ".*.")
    return keys


def strip_how(config: Dict[str, Any]) -> Dict[str, Any]:
    """Take the how-only values out of `{read key: plain value}` (what a stage sees), in place; returns
    them as `{dotted key: value}`. What is left is the stage's identity."""
    removed: Dict[str, Any] = {}
    for read in list(config):
        read_parts = read.split(".")
        for pattern in HOW_KEYS:
            parts = pattern.split(".")
            if not all(p in ("*", r) for p, r in zip(parts, read_parts)):
                continue
            if len(parts) <= len(read_parts):  # the read key lies inside a how-only field: all of it goes
                removed[read] = config.pop(read)
                break
            _pop_how(config[read], parts[len(read_parts):], read, removed)
    return removed


def _pop_how(node: Any, parts: List[str], prefix: str, removed: Dict[str, Any]) -> None:
    if not isinstance(node, dict):
        return
    head, rest = parts[0], parts[1:]
    for key in (list(node) if head == "*" else [head]):
        if key in node and rest:
            _pop_how(node[key], rest, f"{prefix}.{key}", removed)
        elif key in node:
            removed[f"{prefix}.{key}"] = node.pop(key)


HOW_KEYS = how_keys(Config)  # launcher, train.parallel, train.tracker, data.tokenize.workers, ...


def added_defaults(schema: Optional[type] = None, prefix: str = "") -> Dict[str, Any]:
    """{dotted key: default} of the fields marked `added`; `*` stands for any key of a dict field."""
    schema = schema or Config
    hints = typing.get_type_hints(schema)
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        key, kind = f"{prefix}{f.name}", hints[f.name]
        if f.metadata.get("added"):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out[key] = default.value if isinstance(default, enum.Enum) else default
        elif dataclasses.is_dataclass(kind):
            out.update(added_defaults(kind, key + "."))
        elif typing.get_origin(kind) is dict and dataclasses.is_dataclass(typing.get_args(kind)[1]):
            out.update(added_defaults(typing.get_args(kind)[1], key + ".*."))
    return out


ADDED_DEFAULTS = added_defaults(Config)


def strip_added_defaults(config: Dict[str, Any]) -> None:
    """Take the `added` fields still at their default out of `{read key: plain value}`, in place."""
    for read in list(config):
        read_parts = read.split(".")
        for pattern, default in ADDED_DEFAULTS.items():
            parts = pattern.split(".")
            if len(parts) <= len(read_parts) or not all(p in ("*", r) for p, r in zip(parts, read_parts)):
                continue
            _pop_default(config[read], parts[len(read_parts):], default)


def _pop_default(node: Any, parts: List[str], default: Any) -> None:
    if not isinstance(node, dict):
        return
    head, rest = parts[0], parts[1:]
    for key in (list(node) if head == "*" else [head]):
        if key in node and rest:
            _pop_default(node[key], rest, default)
        elif key in node and node[key] == default:
            del node[key]


def _register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=Config)
    # `${root:}` is the project checkout, so the shipped sample corpus resolves from any directory.
    OmegaConf.register_new_resolver("root", lambda: str(CONFIG_DIR.parent), replace=True)


# The config search path: ours first, then each `--config-dir`, then PIPELINE_CONFIG_PATH's dirs. A user dir
# adds configs (experiment/mine.yaml) beside ours; a name we ship is found in ours first.
CONFIG_PATH_ENV = "PIPELINE_CONFIG_PATH"


def user_config_dirs(config_dirs: Sequence[Path] = ()) -> List[Path]:
    """The `--config-dir` dirs, then those of $PIPELINE_CONFIG_PATH (os.pathsep-separated), each checked."""
    named = [("--config-dir", Path(d)) for d in config_dirs]
    named += [(f"${CONFIG_PATH_ENV}", Path(p)) for p in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep) if p]
    for origin, path in named:
        if not path.is_dir():
            raise ConfigError(f"{origin}: {path} is not a directory; give a dir of <group>/<name>.yaml configs "
                              f"(experiment/mine.yaml), searched after {CONFIG_DIR}")
    return [path.resolve() for _, path in named]


def search_path(config_dirs: Sequence[Path] = ()) -> List[Path]:
    return [CONFIG_DIR, *user_config_dirs(config_dirs)]


def description(path: Path) -> str:
    """A config's one-line description: its first comment line that is not a `# @package` directive."""
    for line in path.read_text().splitlines():
        text = line.strip()
        if text.startswith("#") and not text[1:].strip().startswith("@package"):
            return text[1:].strip().rstrip(",;:")  # a sentence that goes on in the next line ends here
        if text and not text.startswith("#"):
            break
    return ""


def _schema_at(parts: Sequence[str]) -> Tuple[Optional[type], int]:
    """Walk the schema along dotted key parts, a dict-of-dataclass field taking one name: (the dataclass
    reached, parts consumed). Stops at a leaf, a plain dict or an unknown name."""
    schema, i = Config, 0
    while i < len(parts):
        kind = typing.get_type_hints(schema).get(parts[i])
        if kind is None:
            break
        if dataclasses.is_dataclass(kind):
            schema, i = kind, i + 1
        elif _entry_schema(kind) and i + 1 < len(parts):
            schema, i = _entry_schema(kind), i + 2
        else:
            break
    return schema, i


def _entry_at(parts: Sequence[str]) -> Optional[int]:
    """How many parts name a dict-of-dataclass field when more follow (data.sources.web.path: 2), else None."""
    schema = Config
    for i, part in enumerate(parts[:-1]):
        kind = typing.get_type_hints(schema).get(part)
        if _entry_schema(kind):
            return i + 1
        if not dataclasses.is_dataclass(kind):
            return None
        schema = kind
    return None


def _entry_schema(kind: Any) -> Optional[type]:
    """X of a Dict[str, X] field when X is a dataclass (data.sources), else None."""
    if typing.get_origin(kind) is dict and dataclasses.is_dataclass(typing.get_args(kind)[1]):
        return typing.get_args(kind)[1]
    return None


def _leaf_keys(schema: Optional[type] = None, prefix: str = "") -> Dict[str, Any]:
    """{dotted key: type} of every field that is not itself a dataclass (a dict field is one leaf)."""
    schema = schema or Config
    keys: Dict[str, Any] = {}
    for name, kind in typing.get_type_hints(schema).items():
        keys.update(_leaf_keys(kind, f"{prefix}{name}.") if dataclasses.is_dataclass(kind) else {prefix + name: kind})
    return keys


def open_keys() -> List[str]:
    """The dict fields, where `+key=` may add a name (data.sources, data.mix.weights)."""
    return [key for key, kind in _leaf_keys().items() if typing.get_origin(kind) is dict]


def _sibling_names(key: str) -> Optional[List[str]]:
    """The field names beside `key` when its parent is a dataclass node of the schema, else None (a dict)."""
    parts = key.split(".")
    schema, used = _schema_at(parts[:-1])
    return [f.name for f in dataclasses.fields(schema)] if used == len(parts) - 1 else None


def nearest_key(key: str) -> Optional[str]:
    """The schema key closest to a misspelt one: a sibling first (train.lrr -> train.lr), else any key with
    a close last part (train.hidden_size -> model.hidden_size)."""
    parent, _, leaf = key.rpartition(".")
    near = difflib.get_close_matches(leaf, _sibling_names(key) or [], n=1)
    if near:
        return f"{parent}.{near[0]}" if parent else near[0]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in _leaf_keys()}
    near = difflib.get_close_matches(leaf, list(by_leaf), n=1)
    return by_leaf[near[0]] if near else None


def _unknown_key(key: str, line: str = "") -> ConfigError:
    near = nearest_key(key)
    return ConfigError(f"{key}: not a key of the schema (pipeline/config.py), so nothing would read it"
                       f"{f' (from {line})' if line else ''}; {f'did you mean {near}? ' if near else ''}"
                       f"`+` adds new names only under {', '.join(open_keys())}")


def _added_keys(node: DictConfig, schema: type, prefix: str = "") -> List[str]:
    """Keys in `node` that its schema does not have. Only `+key=`/`++key=` can put them there: Hydra adds
    those with the struct flag off, even into a dataclass node."""
    hints, out = typing.get_type_hints(schema), []
    for key in node:
        kind, child = hints.get(key), OmegaConf.select(node, str(key), throw_on_missing=False)
        if kind is None:
            out.append(f"{prefix}{key}")
        elif dataclasses.is_dataclass(kind) and isinstance(child, DictConfig):
            out += _added_keys(child, kind, f"{prefix}{key}.")
        elif _entry_schema(kind) and isinstance(child, DictConfig):
            for name in child:
                out += _added_keys(child[name], _entry_schema(kind), f"{prefix}{key}.{name}.")
    return out


def _hydra_overrides(overrides: Sequence[str], config_dirs: Sequence[Path]) -> List[Tuple[str, Any]]:
    """(line, the parsed override it came from) for each override, as Hydra's compose takes them.
    `+data.sources.NAME=V` becomes `+data.sources={NAME: V}`: OmegaConf puts a plain dict into a
    Dict[str, SourceConfig] only by merging (a new source, the SourceConfig defaults filled in). The user
    dirs go in `hydra.searchpath`, after any the overrides give."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out, searchpath = [], []
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        if o.key_or_group == "hydra.searchpath" and isinstance(o.value(), list):
            searchpath += [str(v) for v in o.value()]
            continue
        parts, line = o.key_or_group.split("."), o.input_line
        at = _entry_at(parts)
        if (o.is_add() or o.is_force_add()) and at:
            value = o.get_value_element_as_str()
            for name in reversed(parts[at:]):  # the entry's name, then any keys inside it
                value = f"{{{name}: {value}}}"
            line = f"{'++' if o.is_force_add() else '+'}{'.'.join(parts[:at])}={value}"
        out.append((line, o))
    searchpath += [f"file://{d}" for d in config_dirs]
    if searchpath:
        quoted = ",".join("'" + p.replace("\\", "\\\\").replace("'", "\\'") + "'" for p in searchpath)
        out.insert(0, (f"hydra.searchpath=[{quoted}]", None))
    return out


def _hydra_lines(overrides: Sequence[str], config_dirs: Sequence[Path]) -> List[str]:
    return [line for line, _ in _hydra_overrides(overrides, config_dirs)]


@contextlib.contextmanager
def _hydra(config_dirs: Sequence[Path]):
    """Hydra initialised on our configs/; yields the user dirs to put on its search path."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    dirs = user_config_dirs(config_dirs)
    _register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        yield dirs


def compose(overrides: Sequence[str] = (), config_dirs: Sequence[Path] = ()) -> DictConfig:
    """Hydra composition of configs/config.yaml (the user dirs on its search path) with command-line
    overrides, validated. A key `+key=` added outside the schema is refused, naming the nearest one."""
    from hydra import compose as hydra_compose
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    with _hydra(config_dirs) as dirs:
        lines = _hydra_overrides(overrides, dirs)
        try:
            cfg = hydra_compose(config_name="config", overrides=[line for line, _ in lines])
        except ConfigCompositionException as e:
            key = getattr(e.__cause__, "full_key", None)
            # a field the schema lacks: Hydra's hint (`+key=`) would be refused too; a new dict entry
            # (data.sources.mine.path=) keeps the hint, which works
            if isinstance(e.__cause__, (ConfigKeyError, ConfigAttributeError)) and key and \
                    _sibling_names(key) is not None:
                raise ConfigError(f"Could not override '{key}'. {_unknown_key(key)}") from None
            for line, o in lines:  # name the override as the user wrote it, not as rewritten above
                if o is not None and line != o.input_line and line in str(e):
                    raise ConfigCompositionException(str(e).replace(line, o.input_line)) from e.__cause__
            raise
    added = _added_keys(cfg, Config)
    if added:
        raise _unknown_key(added[0], next((o.input_line for _, o in lines if o is not None and (
            added[0] == o.key_or_group or added[0].startswith(o.key_or_group + "."))), ""))
    OmegaConf.resolve(cfg)
    validate(cfg)
    return cfg


def hydra_config(overrides: Sequence[str] = (), config_dirs: Sequence[Path] = ()) -> DictConfig:
    """Hydra's own node (`hydra:`) for these overrides, unresolved, as `--cfg hydra` shows it."""
    from hydra import compose as hydra_compose

    with _hydra(config_dirs) as dirs:
        return hydra_compose(config_name="config", overrides=_hydra_lines(overrides, dirs),
                             return_hydra_config=True).hydra


def defaults_list(overrides: Sequence[str] = (), config_dirs: Sequence[Path] = ()) -> List[Tuple[str, str, str]]:
    """(config path, package, parent) of each config composed, in merge order; Hydra's own (hydra/*) left out."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    with _hydra(config_dirs) as dirs:
        found = GlobalHydra.instance().config_loader().compute_defaults_list(
            "config", _hydra_lines(overrides, dirs), RunMode.RUN)
    return [(d.config_path, d.package or "_global_", d.parent or "") for d in found.defaults
            if not (d.config_path or "").startswith("hydra/")]


def load_saved(path: Path) -> DictConfig:
    """A resolved config saved in a run dir, re-checked against the schema."""
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
    validate(cfg)
    return cfg


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: DictConfig) -> None:
    """Cross-field rules the types cannot express. Each error names its key."""
    for key in OmegaConf.missing_keys(cfg):
        raise ConfigError(f"{key}: required but not set (give it in the config or as {key}=...)")
    data = cfg.data
    _require(len(data.sources) > 0, "data.sources", "no sources configured")
    _require(data.tokenize.executor in ("local", "ray"), "data.tokenize.executor",
             f"'{data.tokenize.executor}' is not one of local, ray")
    for name, src in data.sources.items():
        key = f"data.sources.{name}"
        _require(bool(src.path), f"{key}.path", "empty path")
        _require(src.format in (None, "jsonl", "json", "parquet", "txt"), f"{key}.format",
                 f"'{src.format}' is not one of jsonl, json, parquet, txt (or leave it unset)")
        _require(src.max_tokens is None or src.max_tokens > 0, f"{key}.max_tokens", "must be > 0")
    tok = data.tokenize
    _require(tok.workers >= 1, "data.tokenize.workers", f"must be >= 1, got {tok.workers}")
    _require(tok.shard_bytes >= 4096, "data.tokenize.shard_bytes", f"must be >= 4096, got {tok.shard_bytes}")
    _require(tok.batch_docs >= 1, "data.tokenize.batch_docs", "must be >= 1")
    _require(tok.split_chars >= 1024, "data.tokenize.split_chars", "must be >= 1024")
    mix = data.mix
    unknown = sorted(set(mix.weights) - set(data.sources))
    _require(not unknown, "data.mix.weights",
             f"weights for unknown sources {unknown}; configured sources: {sorted(data.sources)}")
    missing = sorted(set(data.sources) - set(mix.weights))
    _require(not missing, "data.mix.weights",
             f"no weight for sources {missing}: give each a weight (0 excludes it from the mix)")
    for name, w in mix.weights.items():  # nan fails every comparison; inf would make every share nan
        _require(math.isfinite(w) and w >= 0, f"data.mix.weights.{name}", f"must be a finite number >= 0, got {w}")
    _require(sum(mix.weights.values()) > 0, "data.mix.weights", "all weights are zero")
    _require(0 <= mix.valid_fraction < 1, "data.mix.valid_fraction", f"must be in [0, 1), got {mix.valid_fraction}")
    _require(mix.valid_tokens is None or mix.valid_tokens >= 0, "data.mix.valid_tokens", "must be >= 0")
    if mix.stopping == Stopping.budget:
        _require(mix.total_tokens is not None and mix.total_tokens > 0, "data.mix.total_tokens",
                 "stopping=budget needs a positive total token budget (data.mix.total_tokens=...)")
    validate_training(cfg)
    _require(cfg.export.dtype in (None, "fp32", "bf16", "fp16"), "export.dtype",
             f"'{cfg.export.dtype}' is not one of fp32, bf16, fp16 (or leave it unset)")
    _require(cfg.export.tp >= 1, "export.tp", f"must be >= 1, got {cfg.export.tp}")
    t = cfg.tokenizer
    if t.pretrained is None:
        _require(t.vocab_size >= 256 + 1 + len(t.special_tokens), "tokenizer.vocab_size",
                 f"a byte-level BPE needs at least 256 byte tokens plus the special tokens, got {t.vocab_size}")
    _require(bool(t.eod_token), "tokenizer.eod_token", "an end-of-document token is required")


def value_of(setting: Any) -> Any:
    """A setting's plain value: an enum (from the typed config) or its string (from a plain copy)."""
    return setting.value if isinstance(setting, enum.Enum) else setting


def world_size(cfg: DictConfig) -> int:
    return cfg.launcher.nnodes * cfg.launcher.nproc_per_node


def data_parallel_size(cfg: DictConfig) -> int:
    """Model replicas: every rank for hf; world / (tp x pp) for megatron."""
    if cfg.train.backend != "megatron":
        return world_size(cfg)
    return world_size(cfg) // (cfg.train.parallel.tp * cfg.train.parallel.pp)


def grad_accumulation(cfg: DictConfig) -> int:
    """global batch tokens = micro batch x seq len x data-parallel size x accumulation (micro batches per
    step); an error if it does not divide."""
    t, dp = cfg.train, data_parallel_size(cfg)
    per_step = t.micro_batch_size * t.seq_len * dp
    _require(t.global_batch_tokens % per_step == 0, "train.global_batch_tokens",
             f"{t.global_batch_tokens} tokens is not a multiple of micro_batch_size {t.micro_batch_size} x seq_len "
             f"{t.seq_len} x data-parallel size {dp} = {per_step}; pick a global batch that divides")
    return t.global_batch_tokens // per_step


MODEL_KEYS = {"heads": "model.num_attention_heads", "kv_heads": "model.num_key_value_heads",
              "layers": "model.num_layers"}


def layout_problem(tp: int, pp: int, heads: int, kv_heads: int, ffn: int, layers: int, vpp: Optional[int] = None,
                   padded_vocab: Optional[int] = None,
                   keys: Optional[Dict[str, str]] = None) -> Optional[Tuple[str, str]]:
    """The first way a tp x pp (x vpp) split does not divide a model, as ("tp" or "pp", what does not divide,
    with the numbers), or None. The one rule for training (below) and checkpoint conversion; `keys`
    names where the numbers come from, for the message."""
    at = {what: f" ({key})" for what, key in (keys or {}).items()}
    stages = pp * (vpp or 1)
    split = f"pp {pp} x vpp {vpp} = {stages} pipeline stages" if vpp else f"pp {pp}"
    for dim, rest, message in (
            ("tp", heads % tp, f"{heads} attention heads{at.get('heads', '')} are not divisible by tp {tp}"),
            ("tp", kv_heads % tp, f"{kv_heads} key/value heads{at.get('kv_heads', '')} are not divisible by tp {tp}"),
            ("tp", ffn % tp, f"ffn_hidden_size {ffn} is not divisible by tp {tp}"),
            ("pp", layers % stages, f"{layers} layers{at.get('layers', '')} are not divisible by {split}"),
            ("tp", (padded_vocab or 0) % tp, f"the {padded_vocab}-row padded embedding is not divisible by tp {tp}")):
        if rest:
            return dim, message
    return None


def validate_megatron_layout(cfg: DictConfig) -> None:
    """What megatron-core would assert deep inside its process groups, checked first, with the numbers."""
    par, m, world = cfg.train.parallel, cfg.model, world_size(cfg)
    _require(par.tp >= 1 and par.pp >= 1, "train.parallel.tp", "tp and pp must be >= 1")
    _require(world % (par.tp * par.pp) == 0, "train.parallel",
             f"world size {world} (launcher.nnodes x launcher.nproc_per_node) is not divisible by tp {par.tp} x "
             f"pp {par.pp} = {par.tp * par.pp}")
    problem = layout_problem(par.tp, par.pp, m.num_attention_heads, m.num_key_value_heads or m.num_attention_heads,
                             m.ffn_hidden_size or 4 * m.hidden_size, m.num_layers, vpp=par.vpp or 1, keys=MODEL_KEYS)
    if problem:
        raise ConfigError(f"train.parallel.{problem[0]}: {problem[1]}")
    if par.vpp is not None:
        _require(par.vpp >= 2 and par.pp >= 2, "train.parallel.vpp",
                 f"virtual stages need pp >= 2 and vpp >= 2 (got pp {par.pp}, vpp {par.vpp}); unset vpp otherwise")
        micro = grad_accumulation(cfg)
        _require(micro % par.pp == 0, "train.parallel.vpp",
                 f"the interleaved schedule needs the micro batches per step ({micro}) to be a multiple of pp "
                 f"{par.pp}; change train.global_batch_tokens or train.micro_batch_size")
    _require(not par.sequence_parallel or par.tp > 1, "train.parallel.sequence_parallel",
             "sequence parallelism splits along tensor-parallel ranks: it needs tp > 1")
    _require(cfg.train.make_vocab_size_divisible_by >= 1, "train.make_vocab_size_divisible_by", "must be >= 1")


def recompute_of(train: Any) -> str:
    """train.recompute, else its old name train.parallel.recompute (configs and job.json files written before
    train.recompute existed); a plain dict or the typed config."""
    own = value_of(train.get("recompute", "none"))
    return own if own != "none" else value_of((train.get("parallel") or {}).get("recompute", "none"))


# the trainer settings by name each backend reads; the other's is refused rather than ignored
BACKEND_ARGS = {"hf": "hf_args", "megatron": "megatron_args"}


def validate_trainer_args(t: DictConfig) -> None:
    """Config-level rules of train.recompute, the Adam settings and the by-name passthrough (its names are
    checked against the trainer's own fields by the train stage: pipeline/train/passthrough.py)."""
    own, old = value_of(t.recompute), value_of(t.parallel.recompute)
    _require(own == "none" or old == "none" or own == old, "train.recompute",
             f"{own} but its old name train.parallel.recompute says {old}; set train.recompute only")
    _require(not (t.backend == "hf" and recompute_of(t) == "selective"), "train.recompute",
             "the hf backend recomputes whole layers only (gradient checkpointing): use full, or none")
    for key in ("adam_beta1", "adam_beta2"):
        beta = t[key]
        _require(beta is None or 0 <= beta < 1, f"train.{key}", f"must be in [0, 1), got {beta}")
    _require(t.adam_eps > 0, "train.adam_eps", f"must be > 0, got {t.adam_eps}")
    for backend, key in BACKEND_ARGS.items():
        _require(t.backend == backend or not t[key], f"train.{key}",
                 f"only the {backend} backend reads it (train.backend is {t.backend}); "
                 f"use train.{BACKEND_ARGS[t.backend]}, or leave it empty")


def validate_training(cfg: DictConfig) -> None:
    t, m = cfg.train, cfg.model
    _require(t.backend in ("hf", "megatron"), "train.backend", f"'{t.backend}' is not one of hf, megatron")
    _require(t.zero_stage in (0, 1, 2, 3), "train.zero_stage", f"must be 0, 1, 2 or 3, got {t.zero_stage}")
    _require(t.precision in ("auto", "bf16", "fp16", "fp32"), "train.precision",
             f"'{t.precision}' is not one of auto, bf16, fp16, fp32")
    _require(t.seq_len > 0 and t.micro_batch_size > 0, "train.seq_len", "seq_len and micro_batch_size must be > 0")
    _require(t.seq_len <= m.max_position_embeddings, "train.seq_len",
             f"{t.seq_len} is longer than model.max_position_embeddings {m.max_position_embeddings}")
    _require(0 < t.eval_every and 0 < t.save_every, "train.eval_every", "eval_every and save_every must be > 0")
    # model.family and the model.* features each family supports: pipeline.models.check_model (the
    # families live above this module), run by the train stage's check
    _require(m.head_dim is not None or m.hidden_size % m.num_attention_heads == 0, "model.num_attention_heads",
             f"hidden_size {m.hidden_size} is not divisible by {m.num_attention_heads} heads; set model.head_dim")
    kv = m.num_key_value_heads or m.num_attention_heads
    _require(m.num_attention_heads % kv == 0, "model.num_key_value_heads",
             f"{m.num_attention_heads} attention heads are not divisible by {kv} key/value heads")
    _require(world_size(cfg) >= 1, "launcher.nproc_per_node", "world size must be >= 1")
    if t.backend == "megatron":
        validate_megatron_layout(cfg)
    validate_trainer_args(t)
    grad_accumulation(cfg)


def run_dir_of(cfg: DictConfig) -> Path:
    return Path(cfg.run_dir) if cfg.run_dir else Path("runs") / cfg.name


def subtree(cfg: DictConfig, key: str) -> Any:
    """Plain (JSON-able) value at a dotted key; enums become their string values."""
    node = OmegaConf.select(cfg, key, throw_on_missing=False)
    if isinstance(node, DictConfig) or OmegaConf.is_list(node):
        return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    return value_of(node)
