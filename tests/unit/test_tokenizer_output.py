"""The tokenizer dir we write (portable across transformers 4.x and 5.x, model_max_length, pad), and
`pipeline preprocess` with Megatron-LM's flags: GPT2BPETokenizer from vocab.json + merges.txt, the flags
that change nothing, and errors in flag terms."""
import argparse
import json

import pytest

from pipeline.data.preprocess import NO_EFFECT, add_arguments
from pipeline.data.tokenizer import copy_tokenizer

from conftest import cli, read_bytes, tiny_hf


def test_stage_writes_the_portable_form_with_the_eod_as_pad(tokenizer_dir):
    from transformers import AutoTokenizer

    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    info = json.loads((tokenizer_dir / "pipeline_tokenizer.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # not 5's TokenizersBackend
    assert not isinstance(config.get("extra_special_tokens"), list) and "backend" not in config
    assert config["pad_token"] == config["eos_token"] == "<|endoftext|>"
    assert "model_max_length" not in config  # the stage does not know the trained context
    mapping = json.loads((tokenizer_dir / "special_tokens_map.json").read_text())
    assert mapping["pad_token"] == mapping["eos_token"] == "<|endoftext|>"
    merges = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert merges and all(isinstance(m, str) and m.count(" ") == 1 for m in merges)  # tokenizers < 0.20 reads it
    auto = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert auto.pad_token_id == auto.eos_token_id == info["eod_id"]


def test_copy_beside_a_model_sets_model_max_length_and_keeps_the_ids(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    copied = copy_tokenizer(tokenizer_dir, tmp_path, model_max_length=128)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
            "merges.txt"} <= set(copied) and not (tmp_path / "pipeline_tokenizer.json").exists()
    ours, source = AutoTokenizer.from_pretrained(str(tmp_path)), AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert ours.model_max_length == 128 and source.model_max_length > 10 ** 20
    assert ours.pad_token == "<|endoftext|>"
    text = "def f(x):\n    return x + 1  <|endoftext|> über"
    assert ours(text).input_ids == source(text).input_ids



def test_conversion_to_hf_writes_the_portable_tokenizer_with_the_trained_context(tokenizer_dir, tmp_path):
    """megatron_to_hf: a checkpoint whose args hold seq_len (ours from now on) gives it as model_max_length;
    one without (older, or converted from HF) gives the model's max_position_embeddings."""
    import torch
    from transformers import AutoTokenizer

    from pipeline.convert import megatron_io
    from pipeline.convert.convert import hf_to_megatron, megatron_to_hf
    from pipeline.formats.megatron_args import PIPELINE_ARGS
    from pipeline.safeload import COMMON_FILE

    hf_to_megatron(tiny_hf("llama", tmp_path / "hf"), tmp_path / "meg", fmt="torch_dist")
    megatron_to_hf(tmp_path / "meg", tmp_path / "back", tokenizer=tokenizer_dir)
    positions = json.loads((tmp_path / "hf" / "config.json").read_text())["max_position_embeddings"]
    assert AutoTokenizer.from_pretrained(str(tmp_path / "back")).model_max_length == positions
    assert json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    path, _ = megatron_io.read_args(tmp_path / "meg")  # now with seq_len in its args, as the train stage stores it
    common = torch.load(path / COMMON_FILE, weights_only=False)
    getattr(common["args"], PIPELINE_ARGS)["seq_len"] = 96
    torch.save(common, path / COMMON_FILE)
    megatron_to_hf(tmp_path / "meg", tmp_path / "trained", tokenizer=tokenizer_dir)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "trained")).model_max_length == 96

def test_portable_config_converts_what_4x_refuses():
    from pipeline.data.tokenizer import portable_config

    v5 = {"backend": "tokenizers", "tokenizer_class": "TokenizersBackend", "eos_token": "</s>",
          "extra_special_tokens": ["<a>", "<b>"], "additional_special_tokens": ["<a>"],
          "model_max_length": 10 ** 30, "chat_template": "{{ x }}"}
    assert portable_config(v5) == {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>",
                                   "pad_token": "</s>", "additional_special_tokens": ["<a>", "<b>"],
                                   "chat_template": "{{ x }}"}
    named = {"eos_token": "</s>", "pad_token": "<pad>", "extra_special_tokens": {"image": "<img>"}}
    assert portable_config(named, 4096) == {**named, "tokenizer_class": "PreTrainedTokenizerFast",
                                            "model_max_length": 4096}


# ----------------------------------------------------------------------------- preprocess, Megatron's flags

def preprocess(corpus, prefix, *tokenizer_flags):
    return cli("preprocess", "--input", str(corpus / "code.jsonl"), "--output-prefix", str(prefix), "--workers", "1",
               "--append-eod", *tokenizer_flags)


@pytest.fixture(scope="module")
def hf_path_output(corpus, tokenizer_dir, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("hf_path") / "hf"
    assert preprocess(corpus, prefix, "--tokenizer-type", "HuggingFaceTokenizer",
                      "--tokenizer-model", str(tokenizer_dir)) == 0
    return prefix


def test_gpt2bpe_with_vocab_and_merges_gives_the_hf_path_bytes(corpus, tokenizer_dir, hf_path_output, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import GPT2TokenizerFast

    prefix = tmp_path / "gpt2"
    vocab, merges = str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt")
    assert preprocess(corpus, prefix, "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab,
                      "--merge-file", merges) == 0
    assert read_bytes(f"{prefix}_text_document") == read_bytes(f"{hf_path_output}_text_document")
    # and what transformers' own GPT-2 tokenizer makes of the same two files
    gpt2 = GPT2TokenizerFast(vocab=vocab, merges=merges)  # transformers 5: the two files
    texts = [json.loads(line)["text"] for line in (corpus / "code.jsonl").read_text().splitlines()[:20]]
    docs = IndexedDataset(f"{prefix}_text_document")
    assert [docs[i].tolist() for i in range(20)] == [gpt2(t).input_ids + [gpt2.eos_token_id] for t in texts]


def test_megatron_flags_without_effect_are_accepted_change_nothing_and_say_so(corpus, tokenizer_dir,
                                                                             hf_path_output, tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    helps = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings}
    for flags, _, why in NO_EFFECT:
        assert helps[flags[0]] == f"accepted, no effect: {why}"
    assert {"--lang", "--keep-sequential-samples", "--partitions", "--log-interval",
            "--find-optimal-num-workers", "--workers-to-check", "--max-documents"} <= set(helps)
    prefix = tmp_path / "flags"
    assert preprocess(corpus, prefix, "--tokenizer-model", str(tokenizer_dir), "--lang", "german",
                      "--keep-sequential-samples", "--partitions", "4", "--log-interval", "7", "--keep-newlines",
                      "--find-optimal-num-workers", "--workers-to-check", "2", "4", "--max-documents", "10",
                      "--vocab-size", "99", "--vocab-extra-ids", "3", "--padded-vocab-size", "4096",
                      "--make-vocab-size-divisible-by", "64", "--tokenizer-hf-no-use-fast",
                      "--chat-template", "{{ x }}") == 0
    assert read_bytes(f"{prefix}_text_document") == read_bytes(f"{hf_path_output}_text_document")


@pytest.mark.parametrize("flags, message", [
    (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "v.json"], "needs --vocab-file (vocab.json) and "
                                                                          "--merge-file"),
    (["--tokenizer-model", "tok", "--merge-file", "m.txt"], "--vocab-file/--merge-file are for"),
    (["--tokenizer-model", "tok", "--split-sentences"], "--split-sentences is not supported"),
    (["--tokenizer-model", "tok", "--tokenizer-special-tokens", "<x>"], "--tokenizer-special-tokens is not"),
])
def test_flag_combinations_refused_before_reading_anything(flags, message, tmp_path, capsys):
    assert cli("preprocess", "--input", str(tmp_path / "none.jsonl"), "--output-prefix", str(tmp_path / "o"),
               *flags) == 2
    assert message in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_bad_record_message_names_the_flag(tokenizer_dir, tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": ""}) + "\n")
    assert cli("preprocess", "--input", str(docs), "--output-prefix", str(tmp_path / "o"),
               "--tokenizer-model", str(tokenizer_dir), "--engine", "hf") == 2
    err = capsys.readouterr().err
    assert f"{docs}:2: empty 'text'" in err and "pass --on-bad-record skip (or quarantine)" in err
    assert "data.sources" not in err
    assert cli("preprocess", "--input", str(docs), "--output-prefix", str(tmp_path / "o"),
               "--tokenizer-model", str(tokenizer_dir), "--engine", "hf", "--on-bad-record", "skip") == 0


def test_a_tokenizer_without_eos_is_refused_in_flag_terms(tokenizer_dir, tmp_path, capsys):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    (tok / "tokenizer_config.json").write_text("{}")
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "fine"}) + "\n")
    assert cli("preprocess", "--input", str(docs), "--output-prefix", str(tmp_path / "o"),
               "--tokenizer-model", str(tok)) == 2
    err = capsys.readouterr().err
    assert "has no eos_token" in err and "set eos_token in its tokenizer_config.json" in err
    assert "pipeline run" not in err
