"""The tokenize stage and `pipeline preprocess`: exact bytes whatever the workers or crashes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from omegaconf import OmegaConf

from pipeline.config import compose
from pipeline.data import encoders
from pipeline.data.sources import plan_shards
from pipeline.data.tokenize import Job, encode_shard
from pipeline.formats.indexed import IndexedReader, token_dtype
from pipeline.runner import Runner
from pipeline.stages import STAGES

from conftest import SAMPLE, SOURCES, cli, cli_subprocess, fast_overrides, read_bytes


def test_tokenize_output_is_the_same_bytes_for_one_and_two_workers(corpus, base_run, tmp_path):
    # base_run used workers=2; redo tokenize alone with one worker in a fresh run dir
    run_dir = tmp_path / "w1"
    assert cli("run", *fast_overrides(corpus, run_dir, "data.tokenize.workers=1"), "--only", "tokenizer,tokenize") == 0
    manifest = json.loads((base_run / "tokenize" / "MANIFEST.json").read_text())
    assert sum(m["shards"] for m in manifest["metrics"]["sources"].values()) >= 12  # really sharded
    for s in SOURCES:
        assert read_bytes(run_dir / "tokenize" / s) == read_bytes(base_run / "tokenize" / s), s


def test_kill_9_mid_tokenize_then_rerun_gives_identical_bytes(corpus, base_run, tmp_path):
    run_dir = tmp_path / "killed"
    # tiny shards and one worker make the stage slow enough to be killed in the middle
    args = ["run", *fast_overrides(corpus, run_dir, "data.tokenize.shard_bytes=16384", "data.tokenize.workers=1",
                                   "data.tokenize.engine=hf"), "--only", "tokenizer,tokenize"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scratch = run_dir / "tokenize.partial" / "_scratch"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(scratch.glob("*/*.json"))) < 5:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(scratch.glob("*/*.json")))
    assert done_before >= 5 and not (run_dir / "tokenize").exists(), "killed before publishing"
    result = cli_subprocess(*args)
    assert result.returncode == 0, result.stderr
    assert "resuming partial work" in result.stderr
    for s in SOURCES:  # shard_bytes differs from base_run but shards only cut the work, not the output
        assert read_bytes(run_dir / "tokenize" / s) == read_bytes(base_run / "tokenize" / s), s


def test_preprocess_matches_megatron_preprocess_data(corpus, tokenizer_dir, tmp_path):
    """Megatron's preprocess_data.py --append-eod does, per document: ids = HF tokenizer(text).input_ids,
    ids.append(eos_token_id), IndexedDatasetBuilder.add_document(ids, [len(ids)]). Rebuild that with
    megatron-core's own builder and compare bytes."""
    src = corpus / "code.jsonl"
    prefix = tmp_path / "ours"
    assert cli("preprocess", "--input", str(src), "--output-prefix", str(prefix), "--tokenizer-type",
               "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer_dir), "--workers", "2",
               "--append-eod", "--json-keys", "text", "--shard-bytes", "65536") == 0
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    dtype = token_dtype(len(hf))
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=dtype.type)
    for line in src.read_text().splitlines():
        ids = hf(json.loads(line)["text"]).input_ids + [hf.eos_token_id]
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(str(tmp_path / "ref.idx"))
    assert read_bytes(tmp_path / "ours_text_document") == read_bytes(tmp_path / "ref")
    assert len(IndexedDataset(str(tmp_path / "ours_text_document"))) == len(src.read_text().splitlines())
    assert not Path(f"{prefix}.scratch").exists()


def test_source_token_budget_keeps_whole_documents_in_order(corpus, base_run, tmp_path):
    run_dir = tmp_path / "budget"
    budget = 50_000
    assert cli("run", *fast_overrides(corpus, run_dir, f"data.sources.math.max_tokens={budget}"),
               "--only", "tokenizer,tokenize") == 0
    full, cut = IndexedReader(base_run / "tokenize" / "math"), IndexedReader(run_dir / "tokenize" / "math")
    assert cut.num_tokens <= budget < cut.num_tokens + int(full.lengths[len(cut)])
    np.testing.assert_array_equal(cut.tokens, full.tokens[:cut.num_tokens])


def test_huge_document_is_split_exactly_and_quickly(tokenizer_dir, tmp_path):
    """A 20 MB document encodes in pieces cut at line starts: same ids as HF on the whole text
    (checked on a 2 MB prefix, which HF can still encode whole), and linear time."""
    import gzip
    texts = [json.loads(line)["text"] for line in gzip.open(SAMPLE / "web.jsonl.gz")]
    doc = "\n".join(texts)
    hf = encoders.HFEncoder(tokenizer_dir / "tokenizer.json", add_special_tokens=True)
    assert encoders.splitting_is_exact(hf, texts)
    prefix = doc[:2_000_000]
    whole, _ = hf.encode([prefix])
    parts, _ = hf.encode(encoders.pieces(prefix, 100_000)[0])
    np.testing.assert_array_equal(whole, parts)
    huge = doc * (20_000_000 // len(doc) + 1)
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"text": huge}) + "\n" + json.dumps({"text": "after"}) + "\n")
    t0 = time.perf_counter()
    assert cli("preprocess", "--input", str(path), "--output-prefix", str(tmp_path / "huge"), "--tokenizer",
               str(tokenizer_dir), "--append-eod", "--engine", "hf") == 0
    seconds = time.perf_counter() - t0
    out = IndexedReader(tmp_path / "huge_text_document")
    assert len(out) == 2 and out.doc(1).size == len(hf.encode(["after"])[0]) + 1
    assert seconds < 120, f"{len(huge) / 1e6:.0f} MB document took {seconds:.0f}s"


@pytest.mark.parametrize("engine", ["fastokens", "gigatoken"])
def test_fast_engines_give_hf_ids_on_the_sample_corpus(corpus, tokenizer_dir, engine):
    texts = [json.loads(line)["text"] for s in SOURCES for line in (corpus / f"{s}.jsonl").read_text().splitlines()]
    texts += ["", "a<|endoftext|>b", "  \n\t x", "🤗 héllo"]
    ref = encoders.HFEncoder(tokenizer_dir / "tokenizer.json", True).encode(texts)
    got = encoders.make_encoder(engine, tokenizer_dir / "tokenizer.json", True).encode(texts)
    assert encoders.first_mismatch(ref, got) is None


def test_auto_engine_records_its_check_in_the_manifest(base_run):
    metrics = json.loads((base_run / "tokenize" / "MANIFEST.json").read_text())["metrics"]
    check = metrics["engine_check"]
    assert metrics["engine"] in ("fastokens", "gigatoken") and check["chosen"] == metrics["engine"]
    assert check[metrics["engine"]]["identical_ids"] is True and check["sample_docs"] > 100


def test_tokenizer_dir_loads_with_autotokenizer_and_as_gpt2_vocab_merges(corpus, tokenizer_dir):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer

    info = json.loads((tokenizer_dir / "pipeline_tokenizer.json").read_text())
    auto = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert auto.eos_token == "<|endoftext|>" and auto.eos_token_id == info["eod_id"] and len(auto) == info["vocab_len"]
    assert json.loads((tokenizer_dir / "special_tokens_map.json").read_text())["eos_token"] == "<|endoftext|>"
    # Megatron's GPT2BPETokenizer reads vocab.json + merges.txt as GPT-2's byte-level BPE
    gpt2 = ByteLevelBPETokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"))
    assert gpt2.token_to_id("<|endoftext|>") == info["eod_id"]
    texts = [json.loads(line)["text"] for line in (corpus / "code.jsonl").read_text().splitlines()[:20]]
    assert [e.ids for e in gpt2.encode_batch(texts)] == [auto(t).input_ids for t in texts]


def test_budget_resume_with_a_finished_shard_past_the_budget(corpus, tmp_path):
    """A crash can leave shard 3 finished while shard 2 is not; if shards 0-1 exactly fill the
    budget, the rerun must merge shards 0-1 only, never shard 3 in shard 2's place."""
    run_dir = tmp_path / "run"
    args = fast_overrides(corpus, run_dir, "data.tokenize.shard_bytes=65536", "data.tokenize.workers=1")
    assert cli("run", *args, "--only", "tokenizer,tokenize") == 0
    full = IndexedReader(run_dir / "tokenize" / "math")
    # Replay the crash: shards 0, 1 and 3 finished in the partial dir, shard 2 not.
    partial = run_dir / "tokenize.partial"
    (partial / "_scratch" / "math").mkdir(parents=True)
    src = SimpleNamespace(**OmegaConf.to_container(compose(args).data.sources.math, resolve=True, enum_to_str=True))
    info = json.loads((run_dir / "tokenizer" / "pipeline_tokenizer.json").read_text())
    shards = plan_shards("math", src, 65536)
    assert len(shards) >= 4
    markers = [encode_shard(Job(shard, src, str(run_dir / "tokenizer" / "tokenizer.json"), "hf", True, True,
                                info["eod_id"], info["vocab_len"], "uint16", 512, 1_000_000,
                                str(partial / "_scratch" / "math" / f"{shard.index:06d}")))
               for shard in (shards[0], shards[1], shards[3])]
    budget = markers[0]["tokens"] + markers[1]["tokens"]  # shards 0-1 exactly
    budget_args = [*args, f"data.sources.math.max_tokens={budget}"]
    (partial / ".fingerprint").write_text(Runner(compose(budget_args), STAGES).plan()[1].fingerprint)
    assert cli("run", *budget_args, "--only", "tokenizer,tokenize") == 0
    cut = IndexedReader(run_dir / "tokenize" / "math")
    assert cut.num_tokens == budget
    np.testing.assert_array_equal(cut.tokens, full.tokens[:budget])
