"""Qwen2 / Qwen2.5: the Llama table plus biases on q, k and v (fused like the weights); no head_dim
field (hidden / heads), full attention only."""
from functools import partial

from pipeline.models.llama import (
    ATTN,
    LLAMA_FIELDS,
    LLAMA_IGNORED,
    LLAMA_MAPPINGS,
    LLAMA_MEGATRON,
    ROPE_SCALING,
    decoder_flops,
    decoder_parameters,
)
from pipeline.models.mapping import QKV, Family


def full_attention(layer_types) -> bool:
    return all(t == "full_attention" for t in layer_types or ())


QWEN_FIXED = {"hidden_act": ("silu",), "use_sliding_window": (False,), "layer_types": full_attention}
QWEN_IGNORED = {**LLAMA_IGNORED, "sliding_window": "read only with use_sliding_window, which must be false",
                "max_window_layers": "read only with use_sliding_window, which must be false"}

FAMILY = Family("qwen2", ("Qwen2ForCausalLM",), LLAMA_MAPPINGS + (
    QKV("decoder.layers.*.self_attention.linear_qkv.bias",
        (f"{ATTN}.q_proj.bias", f"{ATTN}.k_proj.bias", f"{ATTN}.v_proj.bias")),
), ignorable_hf=("rotary_emb.inv_freq",), hf_fields={k: v for k, v in LLAMA_FIELDS.items() if k != "head_dim"},
    rope=True, hf_fixed=QWEN_FIXED, hf_ignored=QWEN_IGNORED, megatron={**LLAMA_MEGATRON, "add_qkv_bias": True},
    features=dict(ROPE_SCALING), parameters=partial(decoder_parameters, qkv_bias=True),
    flops=decoder_flops)
