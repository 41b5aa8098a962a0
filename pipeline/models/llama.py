"""Llama-2/3 (3.2's tied embeddings, 3.1's llama3 RoPE scaling) and Mistral (its head_dim, no sliding
window): RMSNorm, SwiGLU, RoPE, grouped-query attention. Qwen2 and Qwen3 build on this table.

megatron-core names are those its local layer spec saves (the norms under Transformer Engine's
names: `linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`)."""
from pipeline.models.mapping import COMMON_HF_IGNORED, QKV, Direct, Family, GatedMLP, Vocab

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

# model.* key -> HF config field (RoPE's fields: Family.rope)
LLAMA_FIELDS = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
                "num_attention_heads": "num_attention_heads", "num_key_value_heads": "num_key_value_heads",
                "ffn_hidden_size": "intermediate_size", "max_position_embeddings": "max_position_embeddings",
                "norm_eps": "rms_norm_eps", "tie_word_embeddings": "tie_word_embeddings", "head_dim": "head_dim"}
LLAMA_MEGATRON = dict(normalization="RMSNorm", gated_linear_unit=True, activation="silu", add_bias_linear=False,
                      add_qkv_bias=False, qk_layernorm=False, position_embedding_type="rope")
ROPE_SCALING = {"rope_scaling": ("none", "linear", "llama3"), "rope_scaling_factor": None,
                "rope_low_freq_factor": None, "rope_high_freq_factor": None,
                "rope_original_max_position_embeddings": None}
LLAMA_IGNORED = {**COMMON_HF_IGNORED, "pretraining_tp": "Llama-2's sliced matmuls: the same product"}
LLAMA_FIXED = {"hidden_act": ("silu",), "attention_bias": (False,), "mlp_bias": (False,),
               "sliding_window": (None,)}  # Mistral's: sliding-window attention is not supported


def decoder_parameters(m, vocab: int, qkv_bias: bool = False, qk_norm: bool = False) -> int:
    """Embeddings (+ output layer unless tied), per layer q/k/v/o (+ q/k/v biases, + q/k norms), a gated
    MLP and two norms, and the final norm."""
    h, heads = m["hidden_size"], m["num_attention_heads"]
    d = m.get("head_dim") or h // heads
    q, kv = heads * d, (m.get("num_key_value_heads") or heads) * d
    ffn = m.get("ffn_hidden_size") or 4 * h
    attention = 2 * h * q + 2 * h * kv + (q + 2 * kv if qkv_bias else 0) + (2 * d if qk_norm else 0)
    per_layer = attention + 3 * h * ffn + 2 * h
    return m["num_layers"] * per_layer + vocab * h * (1 if m["tie_word_embeddings"] else 2) + h


def decoder_flops(m, vocab: int, seq_len: int, gated: bool = True) -> float:
    """Training FLOPs per token (forward + backward = 3x forward, 2 FLOPs per multiply-add), counted as
    Megatron-LM's num_floating_point_operations counts them: the matmuls of q/k/v/o, of attention over
    the whole context (causal masking not discounted), of the MLP (3 matrices gated, 2 not) and of the
    logits. Norms, biases, RoPE and softmax are left out (under 1% at any size that matters)."""
    h, heads = m["hidden_size"], m["num_attention_heads"]
    d = m.get("head_dim") or h // heads
    q, kv = heads * d, (m.get("num_key_value_heads") or heads) * d
    ffn = m.get("ffn_hidden_size") or 4 * h
    projections = 2 * h * q + 2 * h * kv  # q and o; k and v
    attention = 2 * seq_len * q  # scores (q.k) and the weighted sum of values
    mlp = (3 if gated else 2) * h * ffn
    forward = 2 * (m["num_layers"] * (projections + attention + mlp) + h * vocab)
    return 3.0 * forward


FAMILY = Family("llama", ("LlamaForCausalLM", "MistralForCausalLM"), LLAMA_MAPPINGS,
                ignorable_hf=("rotary_emb.inv_freq",), hf_fields=LLAMA_FIELDS, rope=True,
                hf_fixed=LLAMA_FIXED,
                hf_ignored=LLAMA_IGNORED, megatron=LLAMA_MEGATRON, features={"head_dim": None, **ROPE_SCALING},
                parameters=decoder_parameters, flops=decoder_flops)
