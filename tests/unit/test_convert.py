"""Checkpoint conversion HF <-> Megatron torch_dist: bit-exact round trips per family, and bad inputs that
fail naming the tensor, leaving nothing (megatron-core's own reading of them: tests/e2e/test_convert_megatron.py)."""
import json

import pytest

from conftest import cli, tiny_hf


def hf_tensors(path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


ROUND_TRIPS = """
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file
from pipeline.convert.convert import hf_to_megatron, megatron_to_hf, megatron_to_megatron
from pipeline.models import by_architecture

def config_differs(src, back):  # the supported config.json fields (mapped, vocab_size, rope_parameters) that differ
    a, b = (json.loads((p / "config.json").read_text()) for p in (src, back))
    family = by_architecture(a["architectures"][0])
    keys = set(family.hf_fields.values()) | {"vocab_size"} | ({"rope_parameters"} if family.rope else set())
    return sorted(k for k in keys if k in a and a[k] != b.get(k))

def main(src, out):
    before, results = load_file(src / "model.safetensors"), {}
    for fmt in ("torch_dist", "torch"):
        for tp, pp in ((1, 1), (2, 1), (1, 2), (2, 2)):
            name = f"{fmt}_tp{tp}_pp{pp}"
            hf_to_megatron(src, out / name, tp=tp, pp=pp, fmt=fmt)
            megatron_to_hf(out / name, out / (name + "_hf"))
            after = load_file(out / (name + "_hf") / "model.safetensors")
            results[name] = sorted(k for k in after if not torch.equal(after[k], before[k]))
            results[name + "_config"] = config_differs(src, out / (name + "_hf"))
    # another layout without HF: legacy TP2 x PP2 -> legacy TP1 x PP2 -> torch_dist -> HF
    megatron_to_megatron(out / "torch_tp2_pp2", out / "relayout", tp=1, pp=2, fmt="torch")
    megatron_to_megatron(out / "relayout", out / "relayout_dist")
    megatron_to_hf(out / "relayout_dist", out / "relayout_hf")
    after = load_file(out / "relayout_hf" / "model.safetensors")
    results["relayout"] = sorted(k for k in after if not torch.equal(after[k], before[k]))
    results["names"] = sorted(after)
    print("RESULT " + json.dumps(results))

if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
"""


@pytest.mark.parametrize("family", ["llama", "llama3", "mistral", "qwen2", "qwen3", "gpt2"])
def test_round_trips_are_bit_exact_at_every_layout_and_both_formats(tmp_path, family):
    """HF -> Megatron -> HF at TP1PP1, TP2PP1, TP1PP2, TP2PP2 in torch_dist and legacy torch, and legacy
    TP2PP2 -> TP1PP2 -> torch_dist -> HF without HF in between: every tensor back bit for bit (fp32), and
    config.json back with every supported field equal (rope_parameters included). `llama3` is a Llama
    3.2-like llama: tied embeddings, llama3 RoPE scaling, head_dim 32 != hidden / heads."""
    import subprocess
    import sys

    src = tiny_hf(family, tmp_path / "hf", **({} if family == "gpt2" else {"num_hidden_layers": 4}))
    proc = subprocess.run([sys.executable, "-c", ROUND_TRIPS, str(src), str(tmp_path)], capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, proc.stderr[-3000:]
    results = json.loads(line[len("RESULT "):])
    tied = json.loads((src / "config.json").read_text()).get("tie_word_embeddings", family == "gpt2")
    assert tied == (family in ("llama3", "qwen2", "gpt2"))
    assert set(results.pop("names")) == set(hf_tensors(src)) - ({"lm_head.weight"} if tied else set())
    assert results and all(differ == [] for differ in results.values()), results
    assert sorted(p.name for p in (tmp_path / "torch_tp2_pp2" / "iter_0000001").iterdir()) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]




def drop_tensor(path, name):
    from safetensors.torch import save_file

    tensors = hf_tensors(path)
    del tensors[name]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def set_config(path, **values):
    config = json.loads((path / "config.json").read_text())
    config.update(values)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage,message", [
    (lambda p: set_config(p, architectures=["BertForMaskedLM"]), "architecture BertForMaskedLM is not supported"),
    (lambda p: drop_tensor(p, "model.layers.1.mlp.up_proj.weight"),
     "tensors the table needs but the checkpoint lacks: ['model.layers.1.mlp.up_proj.weight']"),
    (lambda p: set_config(p, num_key_value_heads=4),
     "model.layers.0.self_attn.k_proj.weight (hf_to_megatron): expected 64 rows, got 32"),
    (lambda p: set_config(p, vocab_size=1024),
     "model.embed_tokens.weight (hf_to_megatron): expected shape (1024, 64)"),
    (lambda p: set_config(p, sliding_window=4096), "config.json sliding_window: 4096 is not supported by the llama"),
    (lambda p: set_config(p, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
     "config.json rope_parameters.rope_type: 'yarn' is not supported by the llama family"),
    (lambda p: set_config(p, rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0,
                                              "attention_factor": 0.5}),
     "config.json rope_parameters.attention_factor: not a parameter of rope_type 'linear'"),
    (lambda p: set_config(p, attn_logit_softcapping=50.0),
     "config.json attn_logit_softcapping: a field the llama family does not convert"),
    (lambda p: set_config(p, hidden_act="gelu"), "config.json hidden_act: 'gelu' is not supported by the llama"),
], ids=["architecture", "missing_tensor", "shape", "vocab", "sliding_window", "rope_type", "rope_parameter",
        "unknown_field", "activation"])
def test_bad_input_names_the_tensor_and_leaves_nothing(tmp_path, capsys, damage, message):
    src = tiny_hf("llama", tmp_path / "hf")
    damage(src)
    # in-process: these fail while reading the HF side, before megatron-core is loaded
    assert cli("convert", f"src={src}", f"dst={tmp_path / 'out'}", "to=megatron") == 2
    err = capsys.readouterr().err
    assert message in err, err[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no dst, no dst.partial


HF_CONFIGS = {"llama": ("LlamaConfig", "MistralConfig"), "qwen2": ("Qwen2Config",), "qwen3": ("Qwen3Config",),
              "gpt2": ("GPT2Config",)}


@pytest.mark.parametrize("family", sorted(HF_CONFIGS))
def test_every_field_of_the_hf_config_is_accounted_for(family):
    """Each field the family's HF config class holds is mapped, fixed or on the ignore list (with a reason);
    a default config reads without refusal, and one with sliding-window attention on is refused, named."""
    import transformers

    from pipeline.errors import ConversionError
    from pipeline.models import FAMILIES
    from pipeline.models.hf_config import model_from_hf

    fam = FAMILIES[family]
    known = (set(fam.hf_fields.values()) | set(fam.hf_fixed) | set(fam.hf_ignored) | {"vocab_size"}
             | ({"rope_parameters", "rope_scaling", "rope_theta"} if fam.rope else set()))
    for name in HF_CONFIGS[family]:
        config = getattr(transformers, name)().to_dict()
        assert sorted(set(config) - known) == [], name
        assert all(reason for reason in fam.hf_ignored.values())
        window, enabled = (("sliding_window", 4096) if name == "MistralConfig"
                           else ("use_sliding_window", True) if family.startswith("qwen") else (None, None))
        model_from_hf({**config, **({window: None} if name == "MistralConfig" else {})}, fam)
        if window:
            with pytest.raises(ConversionError, match=f"config.json {window}: {enabled} is not supported"):
                model_from_hf({**config, window: enabled}, fam)


@pytest.mark.parametrize("family", ["llama", "llama3", "mistral", "qwen2", "qwen3", "gpt2"])
def test_parameter_count_is_the_hf_models(tmp_path, family):
    """plan.py's count (each family's `parameters`) is the HF model's own number of parameters."""
    from transformers import AutoModelForCausalLM

    from pipeline.models import by_architecture
    from pipeline.models.hf_config import model_from_hf, parameter_count

    src = tiny_hf(family, tmp_path / "hf")
    config = json.loads((src / "config.json").read_text())
    model = model_from_hf(config, by_architecture(config["architectures"][0]))
    hf = AutoModelForCausalLM.from_pretrained(src)
    assert parameter_count(model, config["vocab_size"]) == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("overrides,message", [
    (("model.family=bert",), "model.family: 'bert' is not one of llama, qwen2, qwen3, gpt2"),
    (("model.family=gpt2", "model.rope_scaling=llama3"),
     "model.rope_scaling: llama3 is not supported by the gpt2 family (allowed: none)"),
    (("model.family=qwen2", "model.head_dim=32"), "model.head_dim: 32 is not supported by the qwen2 family"),
    (("model.family=qwen3",), "model.qk_norm: False is not supported by the qwen3 family (allowed: True)"),
    (("model.rope_scaling=llama3", "model.rope_scaling_factor=8"),
     "model.rope_original_max_position_embeddings: llama3 RoPE scaling needs the pretraining context"),
], ids=["family", "gpt2_rope", "qwen2_head_dim", "qwen3_qk_norm", "llama3_context"])
def test_family_and_its_features_are_checked_before_any_stage(corpus, tmp_path, capsys, overrides, message):
    from conftest import fast_overrides

    assert cli("run", *fast_overrides(corpus, tmp_path / "run", *overrides), "--dry-run") == 2
    err = capsys.readouterr().err
    assert message in err, err[-2000:]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("*/MANIFEST.json"))


def test_hf_backend_builds_each_feature_from_model_settings():
    """The hf backend's model (pipeline/models/hf_config.py model_config, as hf_backend.build_model calls it):
    tiny_qwen3 with llama3 RoPE scaling is a Qwen3 with q/k norms over head_dim 32 and HF's rope_parameters,
    and reads back (model_from_hf) to the same model.* settings."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from pipeline.config import CONFIG_DIR, ModelConfig
    from pipeline.models import FAMILIES, check_model
    from pipeline.models.hf_config import model_config, model_from_hf

    tiny = OmegaConf.load(CONFIG_DIR / "model" / "tiny_qwen3.yaml")
    rope = {"rope_scaling": "llama3", "rope_scaling_factor": 8.0, "rope_original_max_position_embeddings": 64}
    settings = OmegaConf.merge(OmegaConf.structured(ModelConfig), tiny, rope, {"vocab_size": 1000})
    check_model(settings)
    model = OmegaConf.to_container(settings)
    config = model_config(model, 1000, 0)
    assert type(config).__name__ == "Qwen3Config" and config.head_dim == 32
    assert config.rope_parameters == {"rope_type": "llama3", "rope_theta": 1e6, "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    hf = AutoModelForCausalLM.from_config(config)
    assert tuple(hf.model.layers[0].self_attn.q_norm.weight.shape) == (32,)
    assert tuple(hf.model.layers[0].self_attn.q_proj.weight.shape) == (4 * 32, 64)
    assert model_from_hf(config.to_dict(), FAMILIES["qwen3"]) == model
