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

import os
import struct
from pathlib import Path
from typing import BinaryIO, Iterator, Tuple

import numpy as np

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
            raise ValueError(f"{bin_file}: {os.path.getsize(bin_file)} bytes, but its lengths need {remaining}")
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
        lengths = np.memmap(self._len_tmp, dtype=np.int32, mode="r", shape=(count,)) if count else np.zeros(0, np.int32)
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
    """Read-only memmap view of a .bin/.idx pair: `doc(i)` is a zero-copy slice."""

    def __init__(self, prefix: Path | str):
        self.prefix = Path(prefix)
        path = idx_path(prefix)
        with open(path, "rb") as f:
            header = f.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES or header[:9] != MAGIC:
            raise ValueError(f"{path}: not a Megatron .idx file (bad magic)")
        version, code, count, doc_count = struct.unpack("<QBQQ", header[9:])
        if version != 1 or code not in CODE_DTYPES:
            raise ValueError(f"{path}: unsupported version {version} or dtype code {code}")
        self.dtype = CODE_DTYPES[code]
        self.lengths = np.memmap(path, np.int32, "r", offset=HEADER_BYTES, shape=(count,)) if count else np.zeros(0, np.int32)
        self.pointers = (np.memmap(path, np.int64, "r", offset=HEADER_BYTES + 4 * count, shape=(count,))
                         if count else np.zeros(0, np.int64))
        self.document_indices = np.memmap(path, np.int64, "r", offset=HEADER_BYTES + 12 * count, shape=(doc_count,))
        size = os.path.getsize(bin_path(prefix))
        self.tokens = np.memmap(bin_path(prefix), self.dtype, "r") if size else np.zeros(0, self.dtype)

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
