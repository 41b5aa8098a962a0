"""Megatron's mmap token format (`.bin` + `.idx`), written streaming and read by memmap.

`.bin` is every token of every document back to back, in the chosen dtype, nothing else.
`.idx` (all little-endian):

    offset  size      field
    0       9         magic b"MMIDIDX\\x00\\x00"
    9       8         u64 version = 1
    17      1         u8 dtype code (4 = int32, 8 = uint16; Megatron's DType enum)
    18      8         u64 S = number of sequences
    26      8         u64 D = number of documents + 1 (length of the document index array)
    34      4*S       int32 sequence lengths (in tokens)
    ...     8*S       int64 sequence byte pointers into .bin (0, len0*itemsize, ...)
    ...     8*D       int64 document indices: sequence index where each document starts, then S

We write one sequence per document (no sentence splitting, as `preprocess_data.py` without
`--split-sentences`), so document indices are 0, 1, ..., S. Worked example: 1,000 documents,
500,000 tokens in uint16 -> .bin = 1,000,000 bytes; .idx = 34 + 4*1000 + 8*1000 + 8*1001 = 20,042 bytes.

The reader we must satisfy is megatron-core's `megatron.core.datasets.indexed_dataset._IndexReader`
(NVIDIA/Megatron-LM, core_r0.16.0, megatron/core/datasets/indexed_dataset.py); tests read our
output with it. Lengths are spooled to a temp file, not kept in memory, so writing a billion
documents needs no more RAM than writing ten.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import time
from pathlib import Path
from typing import BinaryIO, Iterator, NoReturn, Optional, Tuple

import numpy as np

from pipeline.errors import DataError

log = logging.getLogger("pipeline")

MAGIC = b"MMIDIDX\x00\x00"
DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
               np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7, np.dtype(np.uint16): 8}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
HEADER_BYTES = 34
CHUNK = 1 << 20  # entries per streamed chunk of the index arrays


def token_dtype(vocab_len: int) -> np.dtype:
    """Megatron's rule (DType.optimal_dtype): uint16 when the vocabulary has fewer than 65500 entries."""
    return np.dtype(np.uint16) if vocab_len < 65500 else np.dtype(np.int32)


def bin_path(prefix: Path | str) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: Path | str) -> Path:
    return Path(f"{prefix}.idx")


class IndexedWriter:
    """Append documents (or whole pre-encoded shards), then `finish()` publishes prefix.bin/.idx.

    Until `finish()` only `<prefix>.bin.tmp` / `.len.tmp` exist, so a crash never leaves a
    `.bin/.idx` pair that looks complete.
    """

    def __init__(self, prefix: Path | str, dtype: np.dtype):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = Path(f"{prefix}.bin.tmp")
        self._len_tmp = Path(f"{prefix}.len.tmp")
        self._bin: BinaryIO = open(self._bin_tmp, "wb")
        self._lens: BinaryIO = open(self._len_tmp, "wb")
        self.documents = 0
        self.tokens = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one flat token array and their lengths."""
        tokens = np.asarray(tokens)
        if tokens.dtype != self.dtype:
            tokens = tokens.astype(self.dtype)
        lengths = np.asarray(lengths, dtype=np.int32)
        assert int(lengths.sum()) == tokens.size, "lengths do not add up to the tokens given"
        self._bin.write(tokens.tobytes())
        self._lens.write(lengths.tobytes())
        self.documents += lengths.size
        self.tokens += tokens.size

    def add_raw(self, bin_file: Path, lengths: np.ndarray) -> None:
        """Append the first len(lengths) documents of a shard already encoded in this dtype:
        a byte copy, no decode/encode."""
        lengths = np.asarray(lengths, dtype=np.int32)
        remaining = int(lengths.sum()) * self.dtype.itemsize
        if os.path.getsize(bin_file) < remaining:
            raise DataError(f"{bin_file}: {os.path.getsize(bin_file)} bytes, but its lengths need {remaining}")
        with open(bin_file, "rb") as f:
            while remaining:
                block = f.read(min(remaining, 16 << 20))
                self._bin.write(block)
                remaining -= len(block)
        self._lens.write(lengths.tobytes())
        self.documents += lengths.size
        self.tokens += int(lengths.sum())

    def finish(self) -> Tuple[int, int]:
        """Write the .idx from the spooled lengths and publish both files. Returns (documents, tokens)."""
        self._bin.close()
        self._lens.close()
        idx_tmp = Path(f"{self.prefix}.idx.tmp")
        count = self.documents
        lengths = (np.memmap(self._len_tmp, dtype=np.int32, mode="r", shape=(count,))
                   if count else np.zeros(0, np.int32))
        with open(idx_tmp, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", count))
            f.write(struct.pack("<Q", count + 1))
            for start in range(0, count, CHUNK):
                f.write(np.asarray(lengths[start:start + CHUNK], dtype=np.int32).tobytes())
            pointer = 0
            for start in range(0, count, CHUNK):
                chunk = np.asarray(lengths[start:start + CHUNK], dtype=np.int64) * self.dtype.itemsize
                offsets = np.cumsum(chunk) - chunk + pointer
                f.write(offsets.astype(np.int64).tobytes())
                pointer += int(chunk.sum())
            for start in range(0, count + 1, CHUNK):
                f.write(np.arange(start, min(start + CHUNK, count + 1), dtype=np.int64).tobytes())
        del lengths
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(idx_tmp, idx_path(self.prefix))
        self._len_tmp.unlink()
        return self.documents, self.tokens

    def abort(self) -> None:
        for f in (self._bin, self._lens):
            f.close()
        for p in (self._bin_tmp, self._len_tmp, Path(f"{self.prefix}.idx.tmp")):
            p.unlink(missing_ok=True)


class IndexedReader:
    """Read-only memmap view of a .bin/.idx pair: `doc(i)` is a zero-copy slice.

    Opening checks the pair's structure (`check_structure`), so every reader of ours (mix, the HF backend's
    BlockDataset, the train stage, `pipeline verify-data`) refuses a damaged file with a DataError that names
    the file, the byte offset and the entry, instead of reading past it or mixing garbage."""

    def __init__(self, prefix: Path | str):
        self.prefix = Path(prefix)
        path, data = idx_path(prefix), bin_path(prefix)
        for p in (path, data):
            if not p.is_file():
                raise DataError(f"{p}: no such file; a .bin/.idx pair needs both")
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            header = f.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES:
            _corrupt(path, f"{size} bytes, shorter than the {HEADER_BYTES}-byte header")
        if header[:9] != MAGIC:
            _corrupt(path, f"bad magic {header[:9]!r} at byte offset 0 (expected {MAGIC!r}): not a Megatron .idx file")
        version, code, count, doc_count = struct.unpack("<QBQQ", header[9:])
        if version != 1:
            _corrupt(path, f"version {version} at byte offset 9 (only version 1 exists)")
        if code not in CODE_DTYPES:
            _corrupt(path, f"dtype code {code} at byte offset 17 (known codes: {sorted(CODE_DTYPES)})")
        expected = HEADER_BYTES + 12 * count + 8 * doc_count
        if doc_count < 1 or size != expected:
            _corrupt(path, f"{size} bytes, but its header (sequence count {count} at byte offset 18, document index "
                           f"count {doc_count} at byte offset 26) needs {HEADER_BYTES} + 12 x {count} + 8 x "
                           f"{doc_count} = {expected} bytes, with at least 1 document index")
        self.dtype = CODE_DTYPES[code]
        self.lengths = (np.memmap(path, np.int32, "r", offset=HEADER_BYTES, shape=(count,))
                        if count else np.zeros(0, np.int32))
        self.pointers = (np.memmap(path, np.int64, "r", offset=HEADER_BYTES + 4 * count, shape=(count,))
                         if count else np.zeros(0, np.int64))
        self.document_indices = np.memmap(path, np.int64, "r", offset=HEADER_BYTES + 12 * count, shape=(doc_count,))
        self.check_structure()
        self.tokens = np.memmap(data, self.dtype, "r") if os.path.getsize(data) else np.zeros(0, self.dtype)

    def check_structure(self) -> None:
        """Lengths >= 0; each sequence starts where the one before it ends (so pointers rise from 0); the
        .bin holds exactly sum(lengths) tokens; document indices rise from 0 to the sequence count. Chunked
        over the memmaps, so a billion-document index costs its read, not its size in RAM."""
        path, count, itemsize = idx_path(self.prefix), len(self), self.dtype.itemsize
        lengths_at, pointers_at = HEADER_BYTES, HEADER_BYTES + 4 * count
        end = 0  # where the next sequence must start in the .bin, in bytes
        for start in range(0, count, CHUNK):
            lengths = np.asarray(self.lengths[start:start + CHUNK], dtype=np.int64)
            pointers = np.asarray(self.pointers[start:start + CHUNK])
            if (bad := np.flatnonzero(lengths < 0)).size:
                i = start + int(bad[0])
                _corrupt(path, f"sequence {i} has length {int(lengths[bad[0]])} (byte offset {lengths_at + 4 * i})")
            ends = end + np.cumsum(lengths * itemsize)
            starts = np.concatenate(([end], ends[:-1]))
            if (bad := np.flatnonzero(pointers != starts)).size:
                i, j = start + int(bad[0]), start + int(bad[0]) - 1
                before = (f"sequence {j} (length {int(self.lengths[j])} at byte offset {lengths_at + 4 * j}, pointer "
                          f"{int(self.pointers[j])} at byte offset {pointers_at + 8 * j}) ends at byte "
                          f"{int(starts[bad[0]])} of the .bin" if i else "the first sequence must start at byte 0")
                _corrupt(path, f"sequence {i} starts at byte {int(pointers[bad[0]])} of the .bin (pointer at byte "
                               f"offset {pointers_at + 8 * i}), but {before}")
            end = int(ends[-1])
        data_size = os.path.getsize(bin_path(self.prefix))
        if data_size != end:
            _corrupt(bin_path(self.prefix), f"{data_size} bytes, but {path} gives {count} sequences of "
                                            f"{end // itemsize} {self.dtype.name} tokens = {end} bytes")
        docs, docs_at, previous = self.document_indices, HEADER_BYTES + 12 * count, 0
        for start in range(0, docs.shape[0], CHUNK):
            chunk = np.asarray(docs[start:start + CHUNK])
            wrong = np.diff(chunk, prepend=previous) < 0
            wrong |= (chunk < 0) | (chunk > count)
            if start == 0:
                wrong[0] |= chunk[0] != 0
            if start + chunk.size == docs.shape[0]:
                wrong[-1] |= chunk[-1] != count
            if (bad := np.flatnonzero(wrong)).size:
                i = start + int(bad[0])
                _corrupt(path, f"document index {i} is {int(chunk[bad[0]])} (byte offset {docs_at + 8 * i}); document "
                               f"indices must rise from 0 to the sequence count {count}")
            previous = int(chunk[-1])

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def doc(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.lengths[i])]

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.doc(i)


def _corrupt(path: Path, what: str) -> NoReturn:
    raise DataError(f"{path}: {what}. The file is damaged or was not written completely; rebuild it (for a run's "
                    f"files: `pipeline run --force <the stage that wrote it>`)")


SCAN_CHUNK = 1 << 24  # tokens per chunk of an id scan: 32 MiB of uint16
SCAN_SECONDS = 30.0  # the train stage's id scan stops after this; the mix stage's recorded maximum is always checked


def check_token_ids(reader: IndexedReader, vocab_size: Optional[int] = None,
                    seconds: Optional[float] = None) -> Tuple[int, int]:
    """Scan the tokens a chunk at a time: (the largest id, the tokens scanned: all of them unless `seconds`
    ran out first). With vocab_size, the first id outside [0, vocab_size) is a DataError naming the token's
    position, byte offset and document."""
    deadline = None if seconds is None else time.monotonic() + seconds
    top, total = -1, reader.num_tokens
    for start in range(0, total, SCAN_CHUNK):
        chunk = np.asarray(reader.tokens[start:start + SCAN_CHUNK])
        top = max(top, int(chunk.max()))
        if vocab_size is not None and (top >= vocab_size or int(chunk.min()) < 0):
            bad = np.flatnonzero((chunk >= vocab_size) | (chunk < 0))
            if bad.size:
                t = start + int(bad[0])
                doc = int(np.searchsorted(reader.pointers, t * reader.dtype.itemsize, side="right")) - 1
                raise DataError(f"{bin_path(reader.prefix)}: token {t} (byte offset {t * reader.dtype.itemsize}, "
                                f"document {doc}) is id {int(chunk[bad[0]])}, outside the vocabulary of {vocab_size} "
                                f"(ids 0 to {vocab_size - 1}); the data was not made with this tokenizer, or it is "
                                f"damaged: rebuild it")
        if deadline is not None and time.monotonic() > deadline:
            return top, start + chunk.size
    return top, total


def check_training_data(mix_dir: Path, vocab_size: int, seconds: float = SCAN_SECONDS) -> None:
    """Before training: no token id of the mix's train/valid splits is >= the tokenizer's vocab_size. The
    largest id the mix stage recorded in mix_report.json is always compared; the ids themselves are scanned
    while `seconds` last (their structure was checked when the train stage opened them)."""
    report = mix_dir / "mix_report.json"
    splits = json.loads(report.read_text())["splits"] if report.is_file() else {"train": {}, "valid": {}}
    for split, info in splits.items():
        recorded = info.get("max_token_id", -1)  # a report from before it was recorded has none
        if recorded >= vocab_size:
            raise DataError(f"{mix_dir / split}.bin: the mix stage recorded a largest token id of {recorded}, but the "
                            f"tokenizer has {vocab_size} entries; rebuild the data (`pipeline run --force tokenize`)")
    started, scanned, total = time.monotonic(), 0, 0
    for split in splits:
        reader = IndexedReader(mix_dir / split)
        left = max(seconds - (time.monotonic() - started), 0.0)
        scanned += check_token_ids(reader, vocab_size, left)[1] if left else 0
        total += reader.num_tokens
    rest = "" if scanned == total else f" (the {seconds:g} s budget ran out; the rest rests on the mix stage's record)"
    log.info("token ids of %s below the vocabulary size %d: %s of %s tokens scanned%s", mix_dir, vocab_size,
             f"{scanned:,}", f"{total:,}", rest)
