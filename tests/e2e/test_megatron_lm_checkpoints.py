"""Megatron-LM's own checkpoints, written by megatron-core itself (tests/e2e/megatron_lm_writer.py, one
torchrun launch of 4 gloo ranks), convert to HF with megatron-core's logits; and our legacy output at
TP2 PP2 with transformer_impl=local loads strictly into megatron-core's local-spec GPTModel."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, cli, tiny_hf

TRUE_VOCAB, PADDED = 250, 256  # what the writer's models pad
TOLERANCE = 1e-4  # max |logit diff|, fp32 (the bf16 fixture's reference ran on its bf16 weights upcast)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    from pipeline.launch import free_port

    tmp = tmp_path_factory.mktemp("megatron_lm")
    torch.save(torch.randint(0, TRUE_VOCAB, (1, 16), generator=torch.Generator().manual_seed(0)), tmp / "tokens.pt")
    hf = tiny_hf("llama", tmp / "hf")
    assert cli("convert", f"src={hf}", f"dst={tmp / 'ours'}", "to=megatron", "tp=2", "pp=2", "format=torch",
               "transformer_impl=local") == 0
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
                          str(free_port()), str(REPO / "tests" / "e2e" / "megatron_lm_writer.py"), str(tmp / "out"),
                          str(tmp / "tokens.pt"), str(tmp / "ours")], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return tmp


def hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(tokens).logits


def vocab_dirs(tmp: Path) -> dict:
    """A tokenizer of TRUE_VOCAB tokens, and an HF config.json of that vocabulary."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen3Config

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(TRUE_VOCAB)}, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp / "tokenizer")
    Qwen3Config(vocab_size=TRUE_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, intermediate_size=96, eos_token_id=7, bos_token_id=7,
                architectures=["Qwen3ForCausalLM"]).save_pretrained(tmp / "config")
    return {"tokenizer": tmp / "tokenizer", "config": tmp / "config"}


# fixture -> the vocab option its conversion gets (None: the padding is kept, with a warning)
CASES = {"legacy_tp2": "vocab_size", "legacy_pp2_vpp2": "tokenizer", "dist_tp2_module": "config",
         "dist_split_bf16": None, "dist_pp2_gpt2": "vocab_size"}


@pytest.mark.parametrize("name", list(CASES))
def test_megatron_lm_checkpoint_converts_with_megatron_core_logits(written, name, tmp_path, caplog):
    option = CASES[name]
    extra = {"vocab_size": [f"vocab_size={TRUE_VOCAB}"], None: []}.get(option)
    if extra is None:
        extra = [f"{option}={vocab_dirs(tmp_path)[option]}"]
    src = written / "out" / name / "ckpt"
    assert cli("convert", f"src={src}", f"dst={tmp_path / 'hf'}", "to=hf", *extra) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vocab_size"] == (TRUE_VOCAB if option else PADDED)
    assert ("hold only the padded vocab size" in caplog.text) == (option is None)
    if option == "config":
        assert config["eos_token_id"] == 7
    reference = torch.load(written / "out" / name / "logits.pt")
    tokens = torch.load(written / "tokens.pt")
    got = hf_logits(tmp_path / "hf", tokens)
    assert got.shape[-1] == config["vocab_size"]
    diff = (got - reference[..., :config["vocab_size"]]).abs().max().item()
    print(f"{name}: max |logit diff| {diff:.2g}")  # the README's figure (pytest -s)
    assert diff <= TOLERANCE, (name, diff)
    if name == "dist_split_bf16":
        from safetensors import safe_open

        with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_our_legacy_tp2_pp2_local_loads_strictly_in_megatron_core(written):
    """Each rank's file into its own local-spec GPTModel with strict names, and the HF model's logits."""
    from pipeline.safeload import safe_torch_load

    assert json.loads((written / "out" / "ours.json").read_text())["strict_problems"] == [None] * 4
    tokens = torch.load(written / "tokens.pt")
    reference = hf_logits(written / "hf", tokens)
    got = torch.load(written / "out" / "ours_logits.pt")[..., :reference.shape[-1]]
    assert (got - reference).abs().max().item() <= TOLERANCE
    # what Megatron-LM's check_checkpoint_args reads, as a Megatron-LM run at this layout has it
    args = safe_torch_load(written / "ours" / "iter_0000001" / "mp_rank_01_001" / "model_optim_rng.pt")["args"]
    expected = dict(num_layers=2, hidden_size=64, num_attention_heads=4, add_position_embedding=False,
                    max_position_embeddings=2048, make_vocab_size_divisible_by=128, padded_vocab_size=1024,
                    tokenizer_type="HuggingFaceTokenizer", data_parallel_random_init=False,
                    tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert {k: getattr(args, k) for k in expected} == expected


def test_megatron_lm_legacy_to_torch_dist_is_what_train_init_reads(written, tmp_path):
    """The megatron backend's train.init: a legacy dir goes through the import stage (its args are read
    from a rank file); Megatron-LM's legacy files convert to torch_dist holding the same model, which
    train.init reads directly, also under a `release` tracker."""
    import shutil

    from pipeline.formats.checkpoints import TRACKER
    from pipeline.train.stage import megatron_init_args, needs_import

    legacy = written / "out" / "legacy_tp2" / "ckpt"  # its args read from a rank file; the import stage converts it
    assert megatron_init_args(str(legacy))["model"]["family"] == "llama" and needs_import(str(legacy))
    src = written / "out" / "legacy_pp2_vpp2" / "ckpt"
    assert cli("convert", f"src={src}", f"dst={tmp_path / 'td'}", "to=megatron", "format=torch_dist") == 0
    assert megatron_init_args(str(tmp_path / "td"))["model"]["num_layers"] == 4
    released = shutil.copytree(tmp_path / "td", tmp_path / "released")  # Megatron-LM's `release` tracker
    (released / "iter_0000001").rename(released / "release")
    (released / TRACKER).write_text("release")
    assert megatron_init_args(str(released))["model"]["num_layers"] == 4
    assert cli("convert", f"src={tmp_path / 'td'}", f"dst={tmp_path / 'hf'}", "to=hf") == 0
    tokens = torch.load(written / "tokens.pt")
    reference = torch.load(written / "out" / "legacy_pp2_vpp2" / "logits.pt")
    assert (hf_logits(tmp_path / "hf", tokens) - reference).abs().max().item() <= TOLERANCE
