"""`pipeline verify` HF vs HF in-process: identical models agree exactly; a changed rope_theta fails (exit 2)
naming RoPE; a changed tensor is named; a check on a conversion's output keeps a failed one at
<dst>.verify-failed; a tp a Megatron side cannot load at is refused before torchrun; the help of convert and
verify lists every key. (Megatron sides under torchrun: tests/e2e/test_verify.py.)"""
import json
import shutil

import pytest

from pipeline.errors import ConversionError

from conftest import cli, cli_subprocess, tiny_hf


def test_hf_vs_hf_identical_and_rope_theta_changed(tmp_path, capsys):
    a = tiny_hf("llama", tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert cli("verify", f"a={a}", f"b={b}", f"report={tmp_path / 'same.json'}") == 0
    same = json.loads((tmp_path / "same.json").read_text())
    assert same["max_abs_diff"] == 0 and same["kl_divergence"] == 0 and same["top1_agreement"] == 1.0
    assert same["seq_len"] == 1024 and same["passed"]
    config = json.loads((b / "config.json").read_text())
    if "rope_parameters" in config:
        config["rope_parameters"]["rope_theta"] = 500000.0
    config["rope_theta"] = 500000.0
    (b / "config.json").write_text(json.dumps(config))
    assert cli("verify", f"a={a}", f"b={b}", f"report={tmp_path / 'rope.json'}") == 2
    rope = json.loads((tmp_path / "rope.json").read_text())
    assert not rope["passed"] and rope["max_abs_diff"] > 1e-3 and rope["kl_divergence"] > 0
    rope_cause = "rope settings differ: rope_theta 10000 vs 500000; the weights are identical (15 tensors)"
    assert rope_cause in rope["problem"]
    error = capsys.readouterr().err
    assert f"error: b (hf: {b}) does not reproduce a (hf: {a}) at 1024 positions" in error
    assert rope_cause in error and f"(report: {tmp_path / 'rope.json'})" in error


def test_seq_len_capped_at_max_positions(tmp_path):
    a = tiny_hf("gpt2", tmp_path / "a")
    assert cli("verify", f"a={a}", f"b={a}", "seq_len=4096", f"report={tmp_path / 'r.json'}") == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["seq_len"] == 128 and "capped" in report["seq_len_note"]


def perturbed_copy(src, dst, name):
    """src's files at dst, with one tensor changed."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, dirs_exist_ok=True)
    tensors = load_file(src / "model.safetensors")
    tensors[name] = tensors[name] + 0.05
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


def test_a_checked_output_is_published_only_if_it_passes(tmp_path):
    """convert.py's publishing with verify=true's check, on HF outputs (in-process, no torchrun): a good one
    is published with its report; a bad one goes to <dst>.verify-failed, naming the tensor, and no dst."""
    from pipeline.convert.convert import publishing
    from pipeline.convert.verify import ConvertCheck

    a = tiny_hf("llama", tmp_path / "a")
    check = ConvertCheck(a, 16, 1e-4)
    with publishing(tmp_path / "good", [a], False, check) as out:
        shutil.copytree(a, out, dirs_exist_ok=True)
    good = json.loads((tmp_path / "good" / "verify.json").read_text())
    assert good["passed"] and good["b"] == str(tmp_path / "good") and good["seq_len"] == 16
    with pytest.raises(ConversionError) as e:
        with publishing(tmp_path / "bad", [a], False, check) as out:
            perturbed_copy(a, out, "model.layers.0.self_attn.o_proj.weight")
    failed = tmp_path / "bad.verify-failed"
    assert f"b (hf: {failed}) does not reproduce a (hf: {a}) at 16 positions" in str(e.value)
    assert "weights differ in 1 of 15 tensors: decoder.layers.*.self_attention.linear_proj.weight (layers [0]): " \
           "max |diff| 0.05" in str(e.value)
    assert f"kept at {failed} (report: {failed / 'verify.json'}), and {tmp_path / 'bad'} is as it was" in str(e.value)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()
    assert (failed / "model.safetensors").is_file() and not json.loads((failed / "verify.json").read_text())["passed"]


def test_a_tp_a_megatron_side_cannot_load_at_is_refused(tmp_path, capsys):
    a = tiny_hf("llama", tmp_path / "a")
    assert cli("convert", f"src={a}", f"dst={tmp_path / 'mg'}", "to=megatron") == 0
    assert cli("verify", f"a={a}", f"b={tmp_path / 'mg'}", "tp=3") == 2
    error = capsys.readouterr().err
    assert f"error: tp=3: {tmp_path / 'mg'}: 4 attention heads are not divisible by tp 3" in error
    assert not (tmp_path / "mg" / "verify.json").exists()


def test_help_lists_every_key():
    from pipeline.cli import CONVERT_ARGS, VERIFY_ARGS, Arg

    for command, table in (("convert", CONVERT_ARGS), ("verify", VERIFY_ARGS)):
        out = cli_subprocess(command, "--help").stdout
        for key, entry in table.items():
            assert isinstance(entry, Arg) and entry.meaning, f"{command} {key}: give it an Arg with a meaning"
            assert f"  {key}=  (" in out and entry.meaning[:30] in " ".join(out.split()), key
