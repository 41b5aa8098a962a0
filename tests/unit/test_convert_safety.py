"""What `pipeline convert` and `pipeline preprocess` may write over, and what they refuse before writing:
a non-empty or source-clashing destination, a TP/PP split that does not divide the model, a full disk.
Conversions run in-process (the HF -> Megatron writer needs no megatron-core) on a tiny random Llama
(4 heads, 2 KV heads, 2 layers): the file takes about 20 s, most of it the two full-disk subprocesses."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import cli, tiny_hf


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return tiny_hf("llama", tmp_path_factory.mktemp("model") / "hf")


def tree(path):
    """Every file under path (links not followed) with its bytes: equal trees mean nothing was touched."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def convert(capsys, *pairs):
    code = cli("convert", *pairs)
    return code, capsys.readouterr().err


def test_a_non_empty_dst_is_refused_untouched_and_overwrite_true_replaces_it(hf, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "mine.txt").write_text("not the pipeline's")
    code, err = convert(capsys, f"src={hf}", f"dst={dst}", "to=megatron")
    assert code == 2
    assert f"dst: {dst} exists and is not empty; nothing was written. Pass overwrite=true to replace it" in err, err
    assert tree(dst) == {"mine.txt": b"not the pipeline's"} and sorted(os.listdir(tmp_path)) == ["out"]

    assert convert(capsys, f"src={hf}", f"dst={dst}", "to=megatron", "overwrite=true")[0] == 0
    assert sorted(os.listdir(dst)) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the old dst (moved aside) and the partial are gone
    first = tree(dst)
    # a previous output of the same command is replaced only on request too
    code, err = convert(capsys, f"src={hf}", f"dst={dst}", "to=megatron", "format=torch")
    assert code == 2 and "exists and is not empty" in err and tree(dst) == first


@pytest.mark.parametrize("where", ["parent_of_src", "inside_src", "dotdot"])
def test_a_dst_that_holds_or_lies_in_the_source_is_refused_even_with_overwrite(hf, tmp_path, capsys, where):
    src = shutil.copytree(hf, tmp_path / "models" / "hf")
    (tmp_path / "some" / "dir").mkdir(parents=True)
    (tmp_path / "some" / "keep.txt").write_text("keep")
    dst, message = {
        "parent_of_src": (src.parent, f"dst: {src.parent} is or contains the source {src}; nothing was written"),
        "inside_src": (src / "out", f"dst: {src / 'out'} is inside the source {src}; nothing was written"),
        "dotdot": (f"{tmp_path}/some/dir/..", f"dst: {tmp_path}/some/dir/.. names {tmp_path / 'some'} through '..'"),
    }[where]
    before = tree(tmp_path)
    code, err = convert(capsys, f"src={src}", f"dst={dst}", "to=megatron", "overwrite=true")
    assert code == 2 and message in err, err
    assert tree(tmp_path) == before and not (src / "out").exists()


def test_a_dst_that_is_the_working_directory_or_above_is_refused(hf, tmp_path, capsys, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    code, err = convert(capsys, f"src={hf}", f"dst={tmp_path}", "to=megatron", "overwrite=true")
    assert code == 2 and f"dst: {tmp_path} is or contains the working directory" in err, err
    assert os.listdir(tmp_path) == ["work"]


def test_a_symlinked_dst_is_refused_and_with_overwrite_only_the_link_is_replaced(hf, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "theirs.txt").write_text("theirs")
    link = tmp_path / "link"
    link.symlink_to(outside)
    code, err = convert(capsys, f"src={hf}", f"dst={link}", "to=megatron")
    assert code == 2 and f"dst: {link} is a symlink (to {outside}; overwrite=true replaces the link" in err, err
    assert convert(capsys, f"src={hf}", f"dst={link}", "to=megatron", "overwrite=true")[0] == 0
    assert not link.is_symlink() and (link / "latest_checkpointed_iteration.txt").is_file()
    assert tree(outside) == {"theirs.txt": b"theirs"}


def test_a_partial_dir_the_pipeline_did_not_write_is_never_removed(hf, tmp_path, capsys):
    from pipeline.convert.convert import PARTIAL_MARK

    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / "mine.txt").write_text("mine")
    code, err = convert(capsys, f"src={hf}", f"dst={tmp_path / 'out'}", "to=megatron", "overwrite=true")
    assert code == 2 and f"{partial} is in the way and is not a partial output of pipeline convert" in err, err
    assert tree(partial) == {"mine.txt": b"mine"}
    (partial / PARTIAL_MARK).touch()  # as a killed conversion leaves it: removed, and the conversion runs
    assert convert(capsys, f"src={hf}", f"dst={tmp_path / 'out'}", "to=megatron")[0] == 0
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("layout,message", [
    (("tp=3", "format=torch"), "tp=3: 4 attention heads are not divisible by tp 3; nothing was written"),
    (("tp=3",), "tp=3: 4 attention heads are not divisible by tp 3"),  # torch_dist padded for an unusable tp
    (("tp=4", "format=torch"), "tp=4: 2 key/value heads are not divisible by tp 4"),
    (("pp=3", "format=torch"), "pp=3: 2 layers are not divisible by pp 3"),
    (("tp=0",), "tp: must be >= 1, got 0"),
], ids=["tp_heads_legacy", "tp_heads_dist", "tp_kv_heads", "pp_layers", "tp_zero"])
def test_a_split_that_does_not_divide_the_model_is_refused_before_writing(hf, tmp_path, capsys, layout, message):
    code, err = convert(capsys, f"src={hf}", f"dst={tmp_path / 'out'}", "to=megatron", *layout)
    assert code == 2 and message in err, err
    assert os.listdir(tmp_path) == []


def test_megatron_to_megatron_refuses_a_tp_its_padded_vocab_does_not_divide(tmp_path, capsys):
    """The embedding keeps the source's padding (1024 rows, made for tp=1); 6 heads would split at tp=3."""
    src = tiny_hf("llama", tmp_path / "hf", hidden_size=48, num_attention_heads=6, num_key_value_heads=6)
    assert convert(capsys, f"src={src}", f"dst={tmp_path / 'mg'}", "to=megatron")[0] == 0
    code, err = convert(capsys, f"src={tmp_path / 'mg'}", f"dst={tmp_path / 'mg3'}", "to=megatron", "tp=3",
                        "format=torch")
    assert code == 2 and "tp=3: the 1024-row padded embedding is not divisible by tp 3" in err, err
    assert sorted(os.listdir(tmp_path)) == ["hf", "mg"]


@pytest.mark.parametrize("backend", ["hf", "megatron"])
def test_export_checks_its_tp_against_the_trained_model_first(hf, tmp_path, capsys, backend):
    """From the train stage's output (train/hf, or train/checkpoints as a Megatron checkpoint)."""
    from pipeline.convert.stage import check_export_layout
    from pipeline.errors import ConfigError

    train = tmp_path / "train"
    if backend == "hf":
        shutil.copytree(hf, train / "hf")
    else:
        assert convert(capsys, f"src={hf}", f"dst={train / 'checkpoints'}", "to=megatron")[0] == 0
    check_export_layout(train, backend, 2)
    with pytest.raises(ConfigError, match=r"export.tp: 4 attention heads are not divisible by tp 3 \(the model "):
        check_export_layout(train, backend, 3)


def test_the_layout_rule_names_the_numbers():
    """pipeline/config.py layout_problem: training words it with its config keys, conversion without."""
    from pipeline.config import MODEL_KEYS, layout_problem

    assert layout_problem(2, 2, 4, 2, 96, 4) is None
    assert layout_problem(2, 2, 4, 2, 96, 3, vpp=1, keys=MODEL_KEYS) == (
        "pp", "3 layers (model.num_layers) are not divisible by pp 2 x vpp 1 = 2 pipeline stages")
    assert layout_problem(4, 1, 4, 4, 90, 2) == ("tp", "ffn_hidden_size 90 is not divisible by tp 4")


# ----------------------------------------------------------------------------- a full disk

DISK_FULL = """
mount -t tmpfs -o size=200k tmpfs "$1" || exit 99
mkdir "$1/old" && echo keep > "$1/old/a"
"$2" -m pipeline.cli convert "src=$3" "dst=$1/old" to=megatron "format=$4" overwrite=true 2> "$5"
echo "rc=$?"
ls -A "$1" "$1/old"
cat "$1/old/a"
"""


def in_small_tmpfs(*args):
    """The script in a private mount namespace (we are root; else an unprivileged user namespace), so the
    200 KB tmpfs is seen by nothing else and goes with it."""
    for unshare in (["unshare", "-m"], ["unshare", "-rm"]):
        proc = subprocess.run([*unshare, "sh", "-c", DISK_FULL, "sh", *map(str, args)], capture_output=True, text=True)
        if proc.returncode not in (99, 1) or "rc=" in proc.stdout:
            return proc
    pytest.skip(f"cannot mount a tmpfs in a private namespace here: {proc.stderr.strip()[-300:]}")


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_a_full_disk_is_named_and_leaves_no_partial_and_the_old_dst(hf, tmp_path, fmt):
    """torch's legacy zip writer raises `RuntimeError: [enforce fail at inline_container.cc:...]` and
    DCP a CheckpointException; both come out as exit 2 naming the destination and the full disk."""
    (tmp_path / "mnt").mkdir()
    err = tmp_path / "stderr.txt"
    proc = in_small_tmpfs(tmp_path / "mnt", sys.executable, hf, fmt, err)
    assert "rc=2" in proc.stdout, (proc.stdout, err.read_text()[-3000:])
    message = err.read_text()
    assert f"error: {tmp_path / 'mnt' / 'old'}: no space left on device; the partial output old.partial was " \
           f"removed" in message, message[-3000:]
    listing = proc.stdout.split("rc=2", 1)[1]
    assert "old.partial" not in listing and listing.split() == [f"{tmp_path / 'mnt'}:", "old", f"{tmp_path}/mnt/old:",
                                                                  "a", "keep"], listing


# ----------------------------------------------------------------------------- preprocess

@pytest.fixture
def tokenizer_and_docs(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok_dir, docs = tmp_path / "tok", tmp_path / "in" / "docs.jsonl"
    tok_dir.mkdir()
    docs.parent.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["hello world", "the quick brown fox"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["hello world", "the fox"] * 5))
    return tok_dir, docs


def preprocess(capsys, docs, prefix, tok_dir, *extra):
    code = cli("preprocess", "--input", str(docs), "--output-prefix", str(prefix), "--tokenizer", str(tok_dir),
               "--engine", "hf", *extra)
    return code, capsys.readouterr().err


def test_preprocess_refuses_earlier_outputs_without_overwrite(tokenizer_and_docs, tmp_path, capsys):
    tok_dir, docs = tokenizer_and_docs
    prefix = tmp_path / "out" / "corpus"
    assert preprocess(capsys, docs, prefix, tok_dir)[0] == 0
    before = tree(prefix.parent)
    assert sorted(before) == ["corpus.preprocess.json", "corpus_text_document.bin", "corpus_text_document.idx"]
    code, err = preprocess(capsys, docs, prefix, tok_dir)
    assert code == 2, err
    assert f"--output-prefix: {prefix}_text_document.bin exists; nothing was written. Pass --overwrite" in err, err
    assert tree(prefix.parent) == before
    assert preprocess(capsys, docs, prefix, tok_dir, "--overwrite")[0] == 0
    assert sorted(tree(prefix.parent)) == sorted(before)


def test_preprocess_keeps_a_scratch_dir_it_did_not_make_and_outputs_out_of_its_input(tokenizer_and_docs, tmp_path,
                                                                                       capsys):
    tok_dir, docs = tokenizer_and_docs
    scratch = tmp_path / "out" / "corpus.scratch"
    scratch.mkdir(parents=True)
    (scratch / "mine.txt").write_text("mine")
    code, err = preprocess(capsys, docs, tmp_path / "out" / "corpus", tok_dir)
    assert code == 2 and f"--output-prefix: {scratch} exists and is not empty" in err, err
    assert tree(scratch) == {"mine.txt": b"mine"}
    # outputs inside an input dir would be read as input next time (corpus.preprocess.json is a .json)
    code, err = preprocess(capsys, docs.parent, docs.parent / "corpus", tok_dir)
    assert code == 2 and f"{docs.parent}/corpus_text_document.bin is inside the source {docs.parent}" in err, err
    assert os.listdir(docs.parent) == ["docs.jsonl"]


# ----------------------------------------------------------------------------- the runner

def test_the_runner_never_replaces_a_stage_dir_it_did_not_write(tmp_path):
    from omegaconf import OmegaConf

    from pipeline.errors import StageError
    from pipeline.runner import MANIFEST, Runner, Stage

    def run(ctx):
        (ctx.work_dir / "made.txt").write_text("by the stage")
        return {}

    run_dir = tmp_path / "run"
    (run_dir / "out").mkdir(parents=True)
    (run_dir / "out" / "mine.txt").write_text("mine")
    runner = Runner(OmegaConf.create({"name": "x", "run_dir": str(run_dir)}), [Stage("out", (), (), run)])
    with pytest.raises(StageError, match=f"stage out: {run_dir / 'out'} exists but has no {MANIFEST}, so this "
                                         f"pipeline did not write it; nothing was removed"):
        runner.run()
    assert tree(run_dir / "out") == {"mine.txt": b"mine"}
    shutil.rmtree(run_dir / "out")
    runner.run()
    assert (run_dir / "out" / "made.txt").is_file() and (run_dir / "out" / MANIFEST).is_file()
