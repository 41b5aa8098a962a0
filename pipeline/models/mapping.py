"""Named transforms between HF tensors and megatron-core tensors, and the family table they form.

A mapping pairs one megatron-core name with the HF name(s) it is made of; `*` stands for the layer
index. Transforms only merge or split whole (unsharded) tensors; how a tensor is split across TP or
PP is not their concern (torch_dist stores global tensors). Shapes are checked in both directions,
and a mismatch names the mapping, the direction, what was expected and what was found.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from pipeline.errors import ConversionError


@dataclass(frozen=True)
class Geometry:
    """The shapes a family's transforms need, from the model config."""

    hidden: int
    heads: int
    groups: int  # key/value heads
    head_dim: int
    vocab: int  # true vocabulary (HF side)
    padded_vocab: int  # megatron embedding rows


@dataclass(frozen=True)
class Mapping:
    megatron: str
    hf: Tuple[str, ...]

    def at(self, layer: int) -> "Mapping":
        """This mapping for one layer: `*` filled in, so errors name the real tensor."""
        return replace(self, megatron=self.megatron.replace("*", str(layer)),
                       hf=tuple(n.replace("*", str(layer)) for n in self.hf))

    @property
    def per_layer(self) -> bool:
        return "*" in self.megatron

    def to_megatron(self, tensors: Sequence[torch.Tensor], geo: Geometry) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, tensor: torch.Tensor, geo: Geometry) -> List[torch.Tensor]:
        raise NotImplementedError


@dataclass(frozen=True)
class Direct(Mapping):
    """The same tensor under two names; `transpose` for GPT-2's Conv1D ([in, out] in HF)."""

    transpose: bool = False

    def to_megatron(self, tensors, geo):
        return tensors[0].t().contiguous() if self.transpose else tensors[0]

    def to_hf(self, tensor, geo):
        return [tensor.t().contiguous() if self.transpose else tensor]


@dataclass(frozen=True)
class Vocab(Mapping):
    """Embedding-like: megatron pads rows to `padded_vocab` (zeros), HF keeps `vocab` rows."""

    def to_megatron(self, tensors, geo):
        t = tensors[0]
        if t.shape[0] != geo.vocab or t.shape[1] != geo.hidden:
            raise ConversionError(f"{self.hf[0]} (hf_to_megatron): expected shape ({geo.vocab}, {geo.hidden}) "
                                  f"(the config's vocab_size, hidden_size), got {tuple(t.shape)}")
        return torch.cat([t, t.new_zeros(geo.padded_vocab - geo.vocab, t.shape[1])])

    def to_hf(self, tensor, geo):
        if tuple(tensor.shape) != (geo.padded_vocab, geo.hidden):
            raise ConversionError(f"{self.megatron} (megatron_to_hf): expected shape ({geo.padded_vocab}, "
                                  f"{geo.hidden}) (padded vocab, hidden), got {tuple(tensor.shape)}")
        return [tensor[:geo.vocab].clone()]


@dataclass(frozen=True)
class QKV(Mapping):
    """Separate q, k, v (HF) <-> megatron's fused linear_qkv, grouped per key/value head:
    for each group g, [the q heads of g; k_g; v_g]. Works for weights and biases alike.
    `fused=True`: HF holds one [q; k; v] tensor (GPT-2's c_attn, transposed when `transpose`)."""

    fused: bool = False
    transpose: bool = False

    def _sizes(self, geo):
        return geo.heads * geo.head_dim, geo.groups * geo.head_dim

    def to_megatron(self, tensors, geo):
        q_rows, kv_rows = self._sizes(geo)
        if self.fused:
            fused = tensors[0].t() if self.transpose else tensors[0]
            if fused.shape[0] != q_rows + 2 * kv_rows:
                raise ConversionError(f"{self.hf[0]} (hf_to_megatron): expected {q_rows + 2 * kv_rows} fused q/k/v "
                                      f"rows, got {fused.shape[0]}")
            q, k, v = fused.split([q_rows, kv_rows, kv_rows])
        else:
            q, k, v = tensors
            for name, t, rows in zip(self.hf, (q, k, v), (q_rows, kv_rows, kv_rows)):
                if t.shape[0] != rows:
                    raise ConversionError(f"{name} (hf_to_megatron): expected {rows} rows, got {t.shape[0]}")
        rest = q.shape[1:]
        per_group = geo.heads // geo.groups
        grouped = torch.cat([q.reshape(geo.groups, per_group * geo.head_dim, *rest),
                             k.reshape(geo.groups, geo.head_dim, *rest),
                             v.reshape(geo.groups, geo.head_dim, *rest)], dim=1)
        return grouped.reshape(q_rows + 2 * kv_rows, *rest).contiguous()

    def to_hf(self, tensor, geo):
        q_rows, kv_rows = self._sizes(geo)
        if tensor.shape[0] != q_rows + 2 * kv_rows:
            raise ConversionError(f"{self.megatron} (megatron_to_hf): expected {q_rows + 2 * kv_rows} rows "
                                  f"({geo.heads} heads + 2 x {geo.groups} key/value heads of {geo.head_dim}), "
                                  f"got {tensor.shape[0]}")
        rest = tensor.shape[1:]
        per_group = geo.heads // geo.groups
        grouped = tensor.reshape(geo.groups, (per_group + 2) * geo.head_dim, *rest)
        q, k, v = grouped.split([per_group * geo.head_dim, geo.head_dim, geo.head_dim], dim=1)
        q, k, v = (x.reshape(-1, *rest).contiguous() for x in (q, k, v))
        if self.fused:
            fused = torch.cat([q, k, v])
            return [fused.t().contiguous() if self.transpose else fused]
        return [q, k, v]


@dataclass(frozen=True)
class GatedMLP(Mapping):
    """HF gate_proj and up_proj <-> megatron's linear_fc1 = [gate; up]."""

    def to_megatron(self, tensors, geo):
        gate, up = tensors
        if gate.shape != up.shape:
            raise ConversionError(f"{self.hf[0]} and {self.hf[1]} (hf_to_megatron): shapes differ, "
                                  f"{tuple(gate.shape)} vs {tuple(up.shape)}")
        return torch.cat([gate, up])

    def to_hf(self, tensor, geo):
        if tensor.shape[0] % 2:
            raise ConversionError(f"{self.megatron} (megatron_to_hf): expected an even number of rows "
                                  f"([gate; up]), got {tensor.shape[0]}")
        return [t.contiguous() for t in tensor.chunk(2)]


# HF config fields of every family that change neither the weights nor the logits.
COMMON_HF_IGNORED = {
    "architectures": "picks the family (pipeline.models.by_architecture); written back from the family",
    "model_type": "implied by the architecture; written back from the family",
    "_name_or_path": "where HF last loaded the model from",
    "transformers_version": "the version that wrote the file",
    "torch_dtype": "the storage dtype: the tensors carry their own (convert's dtype= casts)",
    "dtype": "the storage dtype: the tensors carry their own (convert's dtype= casts)",
    "use_cache": "generation-time KV cache switch",
    "bos_token_id": "special ids are the tokenizer's; eos_token_id is kept as the checkpoint's eod_id",
    "eos_token_id": "special ids are the tokenizer's; eos_token_id is kept as the checkpoint's eod_id",
    "pad_token_id": "special ids are the tokenizer's",
    "initializer_range": "initialisation only: the weights are given",
    "output_attentions": "HF runtime output switch", "output_hidden_states": "HF runtime output switch",
    "return_dict": "HF runtime output switch", "use_return_dict": "HF runtime output switch",
    "id2label": "classification heads only", "label2id": "classification heads only",
    "problem_type": "classification heads only", "finetuning_task": "HF task metadata",
    "task_specific_params": "HF task metadata", "tokenizer_class": "the tokenizer's files say it",
    "chunk_size_feed_forward": "HF memory option, same result", "is_encoder_decoder": "decoder-only families",
    "tie_encoder_decoder": "decoder-only families", "pruned_heads": "HF pruning bookkeeping",
    "quantization_config": "refused by the tensors' dtypes if present",
    "attention_dropout": "dropout: training only (megatron trains with attention_dropout 0)",
    "torchscript": "HF export option",
}


Check = Union[Tuple[Any, ...], Callable[[Any], bool]]  # the values an HF config field may hold, or a test


@dataclass(frozen=True, eq=False)
class Family:
    """Everything about one model family, in one table (its module in pipeline/models/ fills it in):

    - HF: the architectures served, the tensor table, HF buffers to skip; the HF config's `model_type`,
      its field per model.* key (`hf_fields`), and every other field it may hold: `hf_fixed` (must hold
      one of these values, or pass this test, or the checkpoint is refused naming it) or `hf_ignored`
      (field -> why it does not matter). Any field in none of them is refused.
    - megatron-core: its TransformerConfig settings and GPTModel's position embedding (`megatron`).
    - model.*: the values each optional feature may take for it (`features`; a key not listed must
      keep its default), its parameter count (`parameters(model, vocab)`) and training FLOPs per token
      (`flops(model, vocab, seq_len)`, for TFLOP/s and MFU)."""

    name: str  # our model.family
    architectures: Tuple[str, ...]  # HF config.architectures[0] values served by this table
    mappings: Tuple[Mapping, ...]
    output_layer: str = "output_layer.weight"  # absent from both sides when embeddings are tied
    hf_output: str = "lm_head.weight"
    ignorable_hf: Tuple[str, ...] = field(default_factory=tuple)  # suffixes of HF buffers to skip
    model_type: str = ""  # HF's model_type (AutoConfig.for_model); "" = name
    hf_fields: Dict[str, str] = field(default_factory=dict)  # model.* key -> HF config field
    rope: bool = False  # positions by RoPE: HF's rope_parameters (or rope_theta + rope_scaling) carry them
    hf_fixed: Dict[str, Check] = field(default_factory=dict)
    hf_ignored: Dict[str, str] = field(default_factory=dict)
    megatron: Dict[str, Any] = field(default_factory=dict)
    features: Dict[str, Tuple[Any, ...]] = field(default_factory=dict)  # model.* key -> the values allowed
    parameters: Optional[Callable[[Any, int], int]] = None
    flops: Optional[Callable[[Any, int, int], float]] = None  # training FLOPs per token (model, vocab, seq_len)

    @property
    def hf_model_type(self) -> str:
        return self.model_type or self.name

    def expanded(self, num_layers: int, tied: bool) -> List[Tuple[Mapping, str, Tuple[str, ...]]]:
        """Every (mapping, megatron name, HF names) of a model, layer names filled in, upstream first."""
        out = []
        for m in self.mappings:
            if tied and m.megatron == self.output_layer:
                continue
            for one in (m.at(i) for i in range(num_layers)) if m.per_layer else [m]:
                out.append((one, one.megatron, one.hf))
        return out


def hf_names(entries) -> Dict[str, str]:
    """HF name -> the megatron name that consumes it."""
    return {hf: meg for _, meg, hfs in entries for hf in hfs}
