"""A model's settings in HF's terms and Megatron's: the HF config field of each model.* key per family, the
HF config built from them, and the geometry rules both sides share (the padded embedding, the FFN size)."""
from __future__ import annotations

from typing import Any, Dict

# HF config field per schema field, for each family (AutoConfig.for_model(family, ...)).
CONFIG_FIELDS = {
    "llama": {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_attention_heads":
              "num_attention_heads", "num_key_value_heads": "num_key_value_heads", "ffn_hidden_size":
              "intermediate_size", "max_position_embeddings": "max_position_embeddings", "rope_theta": "rope_theta",
              "norm_eps": "rms_norm_eps", "tie_word_embeddings": "tie_word_embeddings"},
    "gpt2": {"hidden_size": "n_embd", "num_layers": "n_layer", "num_attention_heads": "n_head",
             "ffn_hidden_size": "n_inner", "max_position_embeddings": "n_positions", "norm_eps": "layer_norm_epsilon",
             "tie_word_embeddings": "tie_word_embeddings"},
}
CONFIG_FIELDS["qwen2"] = CONFIG_FIELDS["llama"]


def model_config(model: Dict[str, Any], vocab_size: int, eod_id: int):
    from transformers import AutoConfig

    kwargs = {hf: model[ours] for ours, hf in CONFIG_FIELDS[model["family"]].items() if model.get(ours) is not None}
    return AutoConfig.for_model(model["family"], vocab_size=vocab_size, bos_token_id=eod_id, eos_token_id=eod_id,
                                **kwargs)


def padded_vocab_size(vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron pads the embedding to a multiple of make_vocab_size_divisible_by x TP."""
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


def ffn_size(model: Dict[str, Any]) -> int:
    return model["ffn_hidden_size"] or 4 * model["hidden_size"]
