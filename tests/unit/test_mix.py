"""The mix stage: token-exact shares, stopping rules, a disjoint validation split."""
import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.data.mix import mix
from pipeline.formats.indexed import IndexedReader

from conftest import SOURCES, cli, fast_overrides


def mix_cfg(**kw):
    base = {"weights": {"web": 0.6, "code": 0.3, "math": 0.1}, "by": "tokens", "stopping": "first_exhausted",
            "total_tokens": None, "valid_fraction": 0.02, "valid_tokens": None, "seed": 42}
    return SimpleNamespace(**{**base, **kw})


def run_mix(base_run, tmp_path, **kw):
    inputs = {s: base_run / "tokenize" / s for s in SOURCES}
    return mix(inputs, tmp_path, mix_cfg(**kw))


def doc_hashes(prefix):
    return [hashlib.sha1(d.tobytes()).hexdigest() for d in IndexedReader(prefix)]


@pytest.mark.parametrize("stopping,extra", [("first_exhausted", {}), ("all_exhausted", {}),
                                            ("budget", {"total_tokens": 3_000_000})])
def test_token_shares_within_one_document_per_source(base_run, tmp_path, stopping, extra):
    report = run_mix(base_run, tmp_path, stopping=stopping, **extra)
    for split in ("train", "valid"):
        sources = report["splits"][split]["sources"]
        max_doc = {s: v["max_document_tokens"] for s, v in sources.items()}
        for s, v in sources.items():
            # overshoot: at most its own last document; undershoot: one document of each other source
            assert v["deviation_tokens"] <= max_doc[s] + 1, (split, s, v)
            assert -v["deviation_tokens"] <= sum(m for o, m in max_doc.items() if o != s) + 1, (split, s, v)
    train = report["splits"]["train"]
    assert train["tokens"] == IndexedReader(tmp_path / "train").num_tokens
    assert abs(train["sources"]["web"]["achieved_share"] - 0.6) < 0.01
    if stopping == "budget":
        total = train["tokens"] + report["splits"]["valid"]["tokens"]
        assert 3_000_000 <= total < 3_000_000 + max(s["max_document_tokens"] for s in train["sources"].values())
    if stopping == "first_exhausted":
        assert all(v["repeats"] == 0 for v in train["sources"].values())
    else:  # sources that run out are read again, and the report counts it
        assert any(v["repeats"] > 0 for v in train["sources"].values())


def test_valid_split_is_disjoint_from_train_even_when_sources_repeat(base_run, tmp_path):
    run_mix(base_run, tmp_path, stopping="all_exhausted", valid_fraction=0.05)
    train, valid = set(doc_hashes(tmp_path / "train")), set(doc_hashes(tmp_path / "valid"))
    assert valid and not train & valid


def test_mixed_tokens_are_whole_source_documents_ending_in_eod(base_run, tmp_path):
    run_mix(base_run, tmp_path)
    source_docs = {h for s in SOURCES for h in doc_hashes(base_run / "tokenize" / s)}
    assert set(doc_hashes(tmp_path / "train")) <= source_docs
    eod = json.loads((base_run / "tokenizer" / "pipeline_tokenizer.json").read_text())["eod_id"]
    assert all(d[-1] == eod for d in IndexedReader(tmp_path / "train"))


def test_by_documents_follows_probabilities_and_the_seed(base_run, tmp_path):
    a = run_mix(base_run, tmp_path / "a", by="documents", stopping="all_exhausted", seed=1)
    run_mix(base_run, tmp_path / "b", by="documents", stopping="all_exhausted", seed=1)
    run_mix(base_run, tmp_path / "c", by="documents", stopping="all_exhausted", seed=2)
    assert (tmp_path / "a" / "train.bin").read_bytes() == (tmp_path / "b" / "train.bin").read_bytes()
    assert (tmp_path / "a" / "train.bin").read_bytes() != (tmp_path / "c" / "train.bin").read_bytes()
    docs = {s: v["documents"] for s, v in a["splits"]["train"]["sources"].items()}
    total = sum(docs.values())
    assert abs(docs["web"] / total - 0.6) < 0.05 and abs(docs["math"] / total - 0.1) < 0.05


def test_zero_weight_source_is_excluded(base_run, tmp_path):
    report = run_mix(base_run, tmp_path, weights={"web": 1.0, "code": 0.0, "math": 0.0})
    assert report["excluded_sources"] == ["code", "math"]
    assert set(doc_hashes(tmp_path / "train")) <= set(doc_hashes(base_run / "tokenize" / "web"))


def test_a_weighted_source_with_no_tokens_is_an_error_naming_it(base_run, tmp_path):
    from pipeline.formats.indexed import IndexedWriter

    IndexedWriter(tmp_path / "empty", IndexedReader(base_run / "tokenize" / "web").dtype).finish()
    inputs = {"web": base_run / "tokenize" / "web", "code": tmp_path / "empty", "math": base_run / "tokenize" / "math"}
    with pytest.raises(ValueError, match="data.mix.weights.code: source code has no tokens"):
        mix(inputs, tmp_path / "out", mix_cfg())


@pytest.mark.parametrize("weight", ["inf", "nan", "-0.5"])
def test_a_weight_that_is_not_a_finite_non_negative_number_is_a_config_error_naming_its_key(corpus, tmp_path, capsys,
                                                                                             weight):
    """inf and nan used to reach the mix and fail there with `cannot convert float NaN to integer`."""
    assert cli("run", *fast_overrides(corpus, tmp_path / "run", f"data.mix.weights.code={weight}"), "--dry-run") == 2
    assert f"data.mix.weights.code: must be a finite number >= 0, got {float(weight)}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_sources_of_different_token_dtypes_are_a_data_error_naming_the_files(base_run, tmp_path):
    from pipeline.errors import DataError
    from pipeline.formats.indexed import IndexedWriter

    writer = IndexedWriter(tmp_path / "wide", np.int32)
    writer.add(np.arange(10), np.array([4, 6]))
    writer.finish()
    inputs = {"web": base_run / "tokenize" / "web", "code": tmp_path / "wide", "math": base_run / "tokenize" / "math"}
    with pytest.raises(DataError, match=rf"different token dtypes .*{tmp_path / 'wide'}.bin: int32"):
        mix(inputs, tmp_path / "out", mix_cfg())


def test_valid_split_per_source_is_the_disjoint_union_of_valid_in_order(base_run, tmp_path):
    """valid/<source> holds exactly that source's validation documents; valid.sources tags each token."""
    from pipeline.data.mix import SOURCE_IDS, source_prefix, valid_sources

    report = run_mix(base_run, tmp_path, valid_fraction=0.05)
    names = valid_sources(tmp_path)
    assert names == list(report["weights"]) == list(SOURCES)
    valid, ids = IndexedReader(tmp_path / "valid"), IndexedReader(tmp_path / SOURCE_IDS)
    assert np.array_equal(ids.lengths, valid.lengths) and ids.num_tokens == valid.num_tokens
    per_source = {s: list(IndexedReader(source_prefix(tmp_path, s))) for s in names}
    taken = {s: iter(docs) for s, docs in per_source.items()}
    for doc, tags in zip(valid, ids):
        assert len(set(tags.tolist())) == 1  # one source per document
        source = names[int(tags[0])]
        assert np.array_equal(next(taken[source]), doc)  # the next of that source's documents, in valid's order
    assert all(next(rest, None) is None for rest in taken.values())  # and no document besides
    for s in names:
        got = report["splits"]["valid"]["sources"][s]
        assert (got["documents"], got["tokens"]) == (len(per_source[s]), sum(d.size for d in per_source[s]))
    assert min(len(d) for d in per_source.values()) > 0


def test_no_validation_split_leaves_empty_per_source_files(base_run, tmp_path):
    from pipeline.data.mix import SOURCE_IDS, source_prefix

    run_mix(base_run, tmp_path, valid_fraction=0.0)
    assert IndexedReader(tmp_path / SOURCE_IDS).num_tokens == 0
    assert all(IndexedReader(source_prefix(tmp_path, s)).num_tokens == 0 for s in SOURCES)
