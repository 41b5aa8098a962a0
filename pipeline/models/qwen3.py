"""Qwen3 (dense): the Llama table, no biases, an RMSNorm on each head's queries and keys (HF q_norm /
k_norm, megatron-core's q_layernorm / k_layernorm over head_dim), and its own head_dim."""
from functools import partial

from pipeline.models.llama import (
    LLAMA_FIELDS,
    LLAMA_MAPPINGS,
    LLAMA_MEGATRON,
    ROPE_SCALING,
    decoder_flops,
    decoder_parameters,
)
from pipeline.models.mapping import Direct, Family
from pipeline.models.qwen2 import QWEN_FIXED, QWEN_IGNORED

FAMILY = Family("qwen3", ("Qwen3ForCausalLM",), LLAMA_MAPPINGS + (
    Direct("decoder.layers.*.self_attention.q_layernorm.weight", ("model.layers.*.self_attn.q_norm.weight",)),
    Direct("decoder.layers.*.self_attention.k_layernorm.weight", ("model.layers.*.self_attn.k_norm.weight",)),
), ignorable_hf=("rotary_emb.inv_freq",), hf_fields=LLAMA_FIELDS, rope=True,
    hf_fixed={**QWEN_FIXED, "attention_bias": (False,)}, hf_ignored=QWEN_IGNORED,
    megatron={**LLAMA_MEGATRON, "qk_layernorm": True},
    features={"head_dim": None, "qk_norm": (True,), **ROPE_SCALING},
    parameters=partial(decoder_parameters, qk_norm=True),
    flops=decoder_flops)
