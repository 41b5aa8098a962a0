"""FLOPs per token (pipeline/models/<family>.py) and TFLOP/s / MFU (pipeline/train/throughput.py)."""
import pytest

from pipeline.train import throughput

TINY = dict(family="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, ffn_hidden_size=128,
            num_layers=2, tie_word_embeddings=False)


def megatron_lm_formula(m, vocab, seq, gated=True):
    """Megatron-LM's num_floating_point_operations for one sequence, divided by its tokens: an
    independent statement of the same count (grouped-query attention, swiglu)."""
    h, n, layers = m["hidden_size"], m["num_attention_heads"], m["num_layers"]
    q = (m.get("head_dim") or h // n) * n
    g = m["num_key_value_heads"]
    return 12 * layers * h * h * ((1 + g / n + seq / h) * q / h + m["ffn_hidden_size"] / h * (1.5 if gated else 1)
                                  + vocab / (2 * layers * h))


def test_flops_per_token_by_hand():
    # per layer: q,o 2*64*64 + k,v 2*64*32 + attention 2*32*64 + mlp 3*64*128 = 40960; x2 layers, + logits
    # 64*256 = 98304 multiply-adds; x2 FLOPs, x3 forward + backward
    assert throughput.flops_per_token(TINY, 256, 32) == 589824


@pytest.mark.parametrize("model", [
    TINY,
    dict(TINY, family="qwen3", head_dim=32),  # head_dim != hidden / heads
    dict(family="llama", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, ffn_hidden_size=14336,
         num_layers=32, tie_word_embeddings=False),  # Llama-3-8B
])
def test_flops_match_megatron_lm_count(model):
    assert throughput.flops_per_token(model, 128256, 8192) == pytest.approx(megatron_lm_formula(model, 128256, 8192))


def test_gpt2_counts_an_ungated_mlp():
    gpt2 = dict(TINY, family="gpt2", num_key_value_heads=4)
    assert throughput.flops_per_token(gpt2, 256, 32) == pytest.approx(megatron_lm_formula(gpt2, 256, 32, gated=False))


def test_mfu_arithmetic_and_unknown_peak():
    # 20k tokens/s over 4 devices at 5e10 FLOPs/token = 250 TFLOP/s each; a 1000 TFLOP/s peak: 25%
    assert throughput.step_throughput(2e4, 5e10, 4, 1000.0) == {"tflops_per_device": 250.0, "mfu": 0.25}
    assert throughput.step_throughput(2e4, 5e10, 4, None)["mfu"] is None
    assert throughput.device_peak(312.0) == 312.0
    assert throughput.device_peak() is None  # this machine has no GPU: no peak, no made-up MFU


def test_peak_table_by_device_name():
    assert throughput.peak_of("NVIDIA H100 80GB HBM3") == 989.4
    assert throughput.peak_of("NVIDIA H100 PCIe") == 756.0  # the specific part before the generic name
    assert throughput.peak_of("NVIDIA GH200 480GB") == throughput.peak_of("NVIDIA H200") == 989.4
    assert throughput.peak_of("NVIDIA A100-SXM4-80GB") == 312.0 and throughput.peak_of("Tesla T4") is None
