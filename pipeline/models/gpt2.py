"""GPT-2: learned positions, LayerNorm with bias, GELU, biases everywhere, tied embeddings. HF keeps
its linear layers as Conv1D ([in, out]), hence the transposes, and q/k/v fused in one c_attn."""
from pipeline.models.mapping import QKV, Direct, Family, Vocab

H = "transformer.h.*"
D = "decoder.layers.*"
FAMILY = Family("gpt2", ("GPT2LMHeadModel",), (
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
), ignorable_hf=("attn.bias", "attn.masked_bias"))
