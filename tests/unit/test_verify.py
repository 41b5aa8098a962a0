"""`pipeline verify` HF vs HF in-process: identical models agree exactly; a changed rope_theta fails naming
RoPE; the help of convert and verify lists every key."""
import json
import shutil

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
    assert cli("verify", f"a={a}", f"b={b}", f"report={tmp_path / 'rope.json'}") == 1
    rope = json.loads((tmp_path / "rope.json").read_text())
    assert not rope["passed"] and rope["max_abs_diff"] > 1e-3 and rope["kl_divergence"] > 0
    assert "rope settings differ: rope_theta 10000 vs 500000" in rope["problem"]
    assert "rope settings differ" in capsys.readouterr().err


def test_seq_len_capped_at_max_positions(tmp_path):
    a = tiny_hf("gpt2", tmp_path / "a")
    assert cli("verify", f"a={a}", f"b={a}", "seq_len=4096", f"report={tmp_path / 'r.json'}") == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["seq_len"] == 128 and "capped" in report["seq_len_note"]


def test_help_lists_every_key():
    from pipeline.cli import CONVERT_ARGS, VERIFY_ARGS, Arg

    for command, table in (("convert", CONVERT_ARGS), ("verify", VERIFY_ARGS)):
        out = cli_subprocess(command, "--help").stdout
        for key, entry in table.items():
            assert isinstance(entry, Arg) and entry.meaning, f"{command} {key}: give it an Arg with a meaning"
            assert f"  {key}=  (" in out and entry.meaning[:30] in " ".join(out.split()), key
