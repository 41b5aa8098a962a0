"""Megatron-LM's checkpoint args (pipeline/formats/megatron_args.py) and its enums through the restricted loader."""
import argparse
import io

import pytest
import torch

from pipeline import safeload
from pipeline.errors import ConversionError
from pipeline.formats import megatron_args

LLAMA = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, group_query_attention=True,
             num_query_groups=2, kv_channels=16, max_position_embeddings=128, rotary_base=10000, norm_epsilon=1e-5,
             normalization="RMSNorm", swiglu=True, add_qkv_bias=False, add_bias_linear=False,
             untie_embeddings_and_output_weights=True, position_embedding_type="rope", padded_vocab_size=256,
             make_vocab_size_divisible_by=128)


@pytest.mark.parametrize("changes,family", [({}, "llama"), ({"add_qkv_bias": True}, "qwen2"),
                                            ({"qk_layernorm": True}, "qwen3"),
                                            ({"normalization": "LayerNorm", "swiglu": False, "add_bias_linear": True,
                                              "position_embedding_type": "learned_absolute"}, "gpt2")])
def test_families_from_megatron_lm_args(changes, family):
    args = megatron_args.our_args(argparse.Namespace(**{**LLAMA, **changes}), "ckpt")
    assert args["model"]["family"] == family and args["padded_vocab_size"] == 256
    assert args["model"]["num_key_value_heads"] == 2 and args["model"]["tie_word_embeddings"] is False


@pytest.mark.parametrize("arg,value", [("num_experts", 8), ("multi_latent_attention", True),
                                       ("position_embedding_type", "none")])
def test_what_no_family_holds_is_refused_naming_the_arg(arg, value):
    with pytest.raises(ConversionError, match=arg):
        megatron_args.our_args(argparse.Namespace(**{**LLAMA, arg: value}), "ckpt")


def test_written_namespace_reads_back_and_carries_what_check_checkpoint_args_reads():
    """Every arg Megatron-LM's check_checkpoint_args (megatron/training/checkpointing.py) compares
    unconditionally or for a run with a vocab file and without dist ckpt; global_batch_size (compared only
    with --phase-transition-iterations) is not stored."""
    ours = megatron_args.our_args(argparse.Namespace(**LLAMA), "ckpt")
    ns = megatron_args.namespace(ours, tp=2, pp=2, transformer_impl="local")
    for name in ("num_layers", "hidden_size", "num_attention_heads", "add_position_embedding",
                 "max_position_embeddings", "make_vocab_size_divisible_by", "padded_vocab_size", "tokenizer_type",
                 "data_parallel_random_init", "tensor_model_parallel_size", "pipeline_model_parallel_size"):
        assert hasattr(ns, name), name
    assert megatron_args.our_args(ns, "ckpt") == ours
    translated = megatron_args.model_from_namespace(ns)["model"]
    assert {k: translated[k] for k in ours["model"] if k in translated} == {
        k: ours["model"][k] for k in ours["model"] if k in translated}


def test_megatron_enums_load_by_name_and_a_payload_is_still_refused(tmp_path):
    from megatron.core.transformer.enums import AttnBackend

    buf = io.BytesIO()
    torch.save({"args": argparse.Namespace(**LLAMA, attention_backend=AttnBackend.auto)}, buf)
    loaded = safeload.safe_torch_load(buf.getvalue(), "common.pt")["args"]
    assert getattr(loaded.attention_backend, "value", None) == 5
    buf = io.BytesIO()
    torch.save({"args": argparse.Namespace(x=print)}, buf)
    with pytest.raises(ConversionError, match="builtins.print"):
        safeload.safe_torch_load(buf.getvalue(), "common.pt")


def test_megatron_lm_rng_state_with_numpy_loads_and_a_payload_in_an_array_is_refused():
    """Megatron-LM's rng_state holds np.random.get_state(); an object array's items are still checked."""
    import numpy as np

    buf = io.BytesIO()
    torch.save({"args": argparse.Namespace(**LLAMA), "rng_state": [{"np_rng_state": np.random.get_state()}],
                "model": {"decoder.layers.0.mlp.linear_fc1._extra_state": io.BytesIO(b"te")}}, buf)  # older TE's
    loaded = safeload.safe_torch_load(buf.getvalue(), "model_optim_rng.pt")
    assert loaded["model"]["decoder.layers.0.mlp.linear_fc1._extra_state"].getvalue() == b"te"
    state = loaded["rng_state"][0]["np_rng_state"]
    assert state[0] == "MT19937" and np.array_equal(state[1], np.random.get_state()[1])
    buf = io.BytesIO()
    torch.save({"rng_state": np.array([print], dtype=object)}, buf)
    with pytest.raises(ConversionError, match="builtins.print"):
        safeload.safe_torch_load(buf.getvalue(), "model_optim_rng.pt")


@pytest.mark.parametrize("changes,match", [({}, None), ({"architectures": ["Qwen2ForCausalLM"]}, "family llama"),
                                           ({"hidden_size": 128}, "hidden_size 64 vs 128"),
                                           ({"vocab_size": 300}, "vocab_size 300 must be between")])
def test_config_dir_gives_vocab_and_token_ids_of_the_same_model_only(tmp_path, changes, match):
    from transformers import LlamaConfig

    from pipeline.convert.convert import from_hf_config

    fields = dict(vocab_size=250, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, eos_token_id=5, architectures=["LlamaForCausalLM"])
    LlamaConfig(**{**fields, **changes}).save_pretrained(tmp_path)
    ours = megatron_args.our_args(argparse.Namespace(**LLAMA), "ckpt")
    if match:
        with pytest.raises(ConversionError, match=match):
            from_hf_config(ours, tmp_path)
        return
    got = from_hf_config(ours, tmp_path)
    assert got["vocab_size"] == 250 and got["vocab_known"] and got["hf_config"]["eos_token_id"] == 5
