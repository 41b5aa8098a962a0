"""Llama-2/3 and Mistral (and, with QKV biases, Qwen2): RMSNorm, SwiGLU, RoPE, grouped-query attention.

megatron-core names are those its local layer spec saves (the norms under Transformer Engine's
names: `linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`)."""
from pipeline.models.mapping import QKV, Direct, Family, GatedMLP, Vocab

ATTN = "model.layers.*.self_attn"
LLAMA_MAPPINGS = (
    Vocab("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Direct("decoder.layers.*.self_attention.linear_qkv.layer_norm_weight", ("model.layers.*.input_layernorm.weight",)),
    QKV("decoder.layers.*.self_attention.linear_qkv.weight",
        (f"{ATTN}.q_proj.weight", f"{ATTN}.k_proj.weight", f"{ATTN}.v_proj.weight")),
    Direct("decoder.layers.*.self_attention.linear_proj.weight", (f"{ATTN}.o_proj.weight",)),
    Direct("decoder.layers.*.mlp.linear_fc1.layer_norm_weight", ("model.layers.*.post_attention_layernorm.weight",)),
    GatedMLP("decoder.layers.*.mlp.linear_fc1.weight",
             ("model.layers.*.mlp.gate_proj.weight", "model.layers.*.mlp.up_proj.weight")),
    Direct("decoder.layers.*.mlp.linear_fc2.weight", ("model.layers.*.mlp.down_proj.weight",)),
    Direct("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Vocab("output_layer.weight", ("lm_head.weight",)),
)

FAMILY = Family("llama", ("LlamaForCausalLM", "MistralForCausalLM"), LLAMA_MAPPINGS,
                ignorable_hf=("rotary_emb.inv_freq",))
