"""GPT-2: learned positions, LayerNorm with bias, GELU, biases everywhere, tied embeddings. HF keeps
its linear layers as Conv1D ([in, out]), hence the transposes, and q/k/v fused in one c_attn."""
from functools import partial

from pipeline.models.llama import decoder_flops
from pipeline.models.mapping import COMMON_HF_IGNORED, QKV, Direct, Family, Vocab

H = "transformer.h.*"
D = "decoder.layers.*"
MAPPINGS = (
    Vocab("embedding.word_embeddings.weight", ("transformer.wte.weight",)),
    Direct("embedding.position_embeddings.weight", ("transformer.wpe.weight",)),
    Direct(f"{D}.self_attention.linear_qkv.layer_norm_weight", (f"{H}.ln_1.weight",)),
    Direct(f"{D}.self_attention.linear_qkv.layer_norm_bias", (f"{H}.ln_1.bias",)),
    QKV(f"{D}.self_attention.linear_qkv.weight", (f"{H}.attn.c_attn.weight",), fused=True, transpose=True),
    QKV(f"{D}.self_attention.linear_qkv.bias", (f"{H}.attn.c_attn.bias",), fused=True),
    Direct(f"{D}.self_attention.linear_proj.weight", (f"{H}.attn.c_proj.weight",), transpose=True),
    Direct(f"{D}.self_attention.linear_proj.bias", (f"{H}.attn.c_proj.bias",)),
    Direct(f"{D}.mlp.linear_fc1.layer_norm_weight", (f"{H}.ln_2.weight",)),
    Direct(f"{D}.mlp.linear_fc1.layer_norm_bias", (f"{H}.ln_2.bias",)),
    Direct(f"{D}.mlp.linear_fc1.weight", (f"{H}.mlp.c_fc.weight",), transpose=True),
    Direct(f"{D}.mlp.linear_fc1.bias", (f"{H}.mlp.c_fc.bias",)),
    Direct(f"{D}.mlp.linear_fc2.weight", (f"{H}.mlp.c_proj.weight",), transpose=True),
    Direct(f"{D}.mlp.linear_fc2.bias", (f"{H}.mlp.c_proj.bias",)),
    Direct("decoder.final_layernorm.weight", ("transformer.ln_f.weight",)),
    Direct("decoder.final_layernorm.bias", ("transformer.ln_f.bias",)),
    Vocab("output_layer.weight", ("lm_head.weight",)),
)


def parameters(m, vocab: int) -> int:
    """Per layer: fused q/k/v and proj with biases, fc + proj with biases, two LayerNorms with biases;
    tied embeddings unless untied, learned positions, the final LayerNorm with its bias."""
    h = m["hidden_size"]
    ffn = m.get("ffn_hidden_size") or 4 * h
    per_layer = 4 * h * h + 4 * h + 2 * h * ffn + ffn + h + 4 * h
    embeddings = vocab * h * (1 if m["tie_word_embeddings"] else 2)
    return m["num_layers"] * per_layer + embeddings + m["max_position_embeddings"] * h + 2 * h


FAMILY = Family("gpt2", ("GPT2LMHeadModel",), MAPPINGS, ignorable_hf=("attn.bias", "attn.masked_bias"),
                hf_fields={"hidden_size": "n_embd", "num_layers": "n_layer", "num_attention_heads": "n_head",
                           "ffn_hidden_size": "n_inner", "max_position_embeddings": "n_positions",
                           "norm_eps": "layer_norm_epsilon", "tie_word_embeddings": "tie_word_embeddings"},
                # gelu_new is the tanh GELU megatron-core runs as gelu_tanh (logits match after conversion)
                hf_fixed={"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "scale_attn_weights": (True,),
                          "scale_attn_by_inverse_layer_idx": (False,), "add_cross_attention": (False,)},
                hf_ignored={**COMMON_HF_IGNORED, "n_ctx": "GPT-2's old alias of n_positions",
                            "attn_pdrop": "dropout: training only", "embd_pdrop": "dropout: training only",
                            "resid_pdrop": "dropout: training only",
                            "reorder_and_upcast_attn": "fp32 attention scores: numerics only, same model",
                            **dict.fromkeys(("summary_type", "summary_use_proj", "summary_activation",
                                             "summary_proj_to_labels", "summary_first_dropout"),
                                            "the sequence-summary head: GPT2DoubleHeadsModel only")},
                megatron=dict(normalization="LayerNorm", gated_linear_unit=False, activation="gelu_tanh",
                              add_bias_linear=True, add_qkv_bias=True, qk_layernorm=False,
                              position_embedding_type="learned_absolute"),
                parameters=parameters, flops=partial(decoder_flops, gated=False))
