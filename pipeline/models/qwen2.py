"""Qwen2 / Qwen2.5: the Llama table plus biases on q, k and v (fused like the weights)."""
from pipeline.models.llama import ATTN, LLAMA_MAPPINGS
from pipeline.models.mapping import QKV, Family

FAMILY = Family("qwen2", ("Qwen2ForCausalLM",), LLAMA_MAPPINGS + (
    QKV("decoder.layers.*.self_attention.linear_qkv.bias",
        (f"{ATTN}.q_proj.bias", f"{ATTN}.k_proj.bias", f"{ATTN}.v_proj.bias")),
), ignorable_hf=("rotary_emb.inv_freq",))
