"""The default experiment, as `make pretrain` runs it: every stage end to end on the shipped corpus."""
import json


def test_default_experiment_runs_every_stage_end_to_end(default_run):
    """What `make pretrain` runs, unchanged but for the run dir: the shipped corpus, 4096-entry BPE."""
    from pipeline.formats.indexed import IndexedReader

    tmp_path = default_run
    manifests = {s: json.loads((tmp_path / s / "MANIFEST.json").read_text()) for s in ("tokenizer", "tokenize", "mix")}
    assert manifests["tokenizer"]["metrics"]["vocab_len"] == 4096
    report = json.loads((tmp_path / "mix" / "mix_report.json").read_text())
    assert report["weights"] == {"web": 0.85, "code": 0.12, "math": 0.03}
    train = IndexedReader(tmp_path / "mix" / "train")
    assert train.num_tokens == report["splits"]["train"]["tokens"] > 100_000
    assert str(train.dtype) == "uint16"
    # one epoch of the tiny Llama on 2 ZeRO-2 processes; the result loads and generates
    summary = json.loads((tmp_path / "train" / "train_summary.json").read_text())
    first_loss = json.loads((tmp_path / "train" / "train_log.jsonl").read_text().splitlines()[0])["loss"]
    blocks_per_step = 16  # 4 micro x 2 ranks x 2 accumulation; the Trainer rounds the last partial step up
    assert 0 <= summary["steps"] - (train.num_tokens // 128) / blocks_per_step <= 1
    assert summary["eval_loss"] < first_loss - 1.5
    assert (tmp_path / "train" / "swanlog").is_dir()  # swanlab, local mode, by default
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "train" / "hf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "train" / "hf")
    ids = tok("The", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape[1] == ids.shape[1] + 5
