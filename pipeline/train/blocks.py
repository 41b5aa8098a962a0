"""The HF backend's dataset: a mixed .bin read as one token stream cut into seq_len blocks.

Documents are already concatenated with EOD between them in the .bin (the seeds' `group_texts`),
so block i is simply tokens[i*L:(i+1)*L] of the memmap: no copies of the corpus, no re-tokenization.
The tail shorter than one block is dropped, as group_texts does. Labels are the inputs; the model
shifts them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.formats.indexed import IndexedReader


class BlockDataset(torch.utils.data.Dataset):
    def __init__(self, prefix: Path | str, seq_len: int):
        self.tokens = IndexedReader(prefix).tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return self.tokens.shape[0] // self.seq_len

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        block = torch.from_numpy(np.asarray(self.tokens[i * self.seq_len:(i + 1) * self.seq_len], dtype=np.int64))
        return {"input_ids": block, "labels": block}
