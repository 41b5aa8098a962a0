"""The .bin/.idx writer against megatron-core's own reader and builder."""
import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from pipeline.formats.indexed import IndexedReader, IndexedWriter, token_dtype


@pytest.mark.parametrize("vocab_len", [4096, 100_000])
def test_round_trip_through_megatron_reader_and_same_bytes_as_its_builder(tmp_path, vocab_len):
    rng = np.random.default_rng(0)
    dtype = token_dtype(vocab_len)
    assert dtype == (np.uint16 if vocab_len < 65500 else np.int32)
    docs = [rng.integers(0, vocab_len, size=int(n)) for n in rng.integers(1, 300, size=257)]
    ours = IndexedWriter(tmp_path / "ours", dtype)
    for chunk in (docs[:100], docs[100:101], docs[101:]):  # several appends, as shards arrive
        ours.add(np.concatenate(chunk), np.array([len(d) for d in chunk]))
    assert ours.finish() == (257, sum(map(len, docs)))

    ds = IndexedDataset(str(tmp_path / "ours"))
    assert len(ds) == len(docs)
    for i in (0, 1, 100, 256):
        np.testing.assert_array_equal(ds[i], docs[i])
    np.testing.assert_array_equal(ds.document_indices, np.arange(len(docs) + 1))

    builder = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=dtype.type)
    for d in docs:
        builder.add_document(torch.tensor(d), [len(d)])
    builder.finalize(str(tmp_path / "theirs.idx"))
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "theirs.bin").read_bytes()
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "theirs.idx").read_bytes()

    reader = IndexedReader(tmp_path / "ours")
    assert reader.dtype == dtype and len(reader) == 257
    np.testing.assert_array_equal(reader.doc(100), docs[100])


def test_unfinished_writer_publishes_nothing(tmp_path):
    w = IndexedWriter(tmp_path / "x", np.uint16)
    w.add(np.arange(10), np.array([4, 6]))
    w.abort()
    assert list(tmp_path.iterdir()) == []
