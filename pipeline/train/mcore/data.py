"""The megatron backend's data: megatron-core's GPTDataset over the mixed .bin/.idx, and this rank's
micro batches of each global batch in Megatron's pretraining sampler order."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Union

import numpy as np
import torch
import torch.distributed as dist

from pipeline.train.job import TrainJob
from pipeline.train.mcore.model import uses_te


class _TokenizerInfo:
    """What GPTDataset needs of a tokenizer: the EOD id (for masks) and the vocabulary size."""

    def __init__(self, eod: int, vocab_size: int):
        self.eod, self.vocab_size, self.unique_identifiers = eod, vocab_size, {"eod": eod, "vocab": vocab_size}


def build_datasets(job: Union[TrainJob, Mapping], train_samples: int, valid_samples: int):
    """megatron-core's GPTDataset over the mixed train/valid .bin/.idx (one blend entry per split).
    A split asked for more samples than it holds is walked again in a new shuffled order. With the mix's
    valid.sources stream, each valid sample also carries its tokens' sources (Sourced)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    job = TrainJob.of(job)
    t = job.train
    config = GPTDatasetConfig(
        random_seed=t.seed, sequence_length=t.seq_len,
        blend_per_split=[([job.train_prefix], None), ([job.valid_prefix], None) if valid_samples else None, None],
        tokenizer=_TokenizerInfo(job.eod_id, job.vocab_size),
        # train.document_mask: megatron-core's own reset options; its [1, s, s] mask then blocks attention
        # across the EOD boundaries (step.model_inputs says how each attention consumes it)
        reset_position_ids=t.document_mask, reset_attention_mask=t.document_mask, eod_mask_loss=t.eod_mask_loss,
        # an explicit causal mask: megatron's default one is built on CUDA. None for TE's packed rows, which
        # take their boundaries from the position ids
        create_attention_mask=not (t.document_mask and uses_te()),
        path_to_cache=str(Path(job.work_dir) / "dataset_cache"),
    )
    # every rank reads its own micro batches; rank 0 builds the index caches first, the others then load them
    build = BlendedMegatronDatasetBuilder(GPTDataset, [train_samples, valid_samples, 0], lambda: True, config).build
    # the source stream through the same GPTDataset: its indices depend only on the documents' lengths,
    # which are valid.bin's, and the config's seed and sizes (checked in Sourced)
    sources = dataclasses.replace(config, blend_per_split=[None, ([job.valid_source_ids], None), None])
    build_sources = BlendedMegatronDatasetBuilder(GPTDataset, [0, valid_samples, 0], lambda: True, sources).build
    with_sources = bool(valid_samples and job.valid_source_ids)
    if dist.get_rank() == 0:
        train, valid, _ = build()
        ids = build_sources()[1] if with_sources else None
    dist.barrier()
    if dist.get_rank() != 0:
        train, valid, _ = build()
        ids = build_sources()[1] if with_sources else None
    return train, Sourced(valid, ids) if ids is not None else valid


class Sourced:
    """The valid GPTDataset's samples, each with `sources`: the source index of each label (sample i of the
    same GPTDataset over valid.sources, whose labels line up with valid's token for token)."""

    def __init__(self, valid, ids):
        for name in ("document_index", "sample_index", "shuffle_index"):
            if not np.array_equal(getattr(valid, name), getattr(ids, name)):
                raise RuntimeError(f"GPTDataset over {ids.dataset.path_prefix} is not laid out as the valid split "
                                   f"({name} differs): rebuild the mix (`pipeline run --force mix`)")
        self.valid, self.ids = valid, ids

    def __len__(self) -> int:
        return len(self.valid)

    def __getitem__(self, i: int) -> dict:
        return {**self.valid[i], "sources": self.ids[i]["labels"]}


class MicroBatches:
    """This rank's micro batches of a global batch: Megatron's pretraining sampler order.

    Global batch `step` holds samples [step*G, (step+1)*G); micro batch m gives data-parallel rank r
    the samples step*G + m*(mbs*dp) + r*mbs + [0, mbs). The position is the step, so resume is exact.
    """

    def __init__(self, dataset, global_batch: int, micro_batch: int, dp_rank: int, dp: int):
        self.dataset, self.global_batch = dataset, global_batch
        self.micro_batch, self.dp_rank, self.dp = micro_batch, dp_rank, dp

    def batch(self, step: int):
        """An iterator over this rank's micro batches of global batch `step`."""
        start = step * self.global_batch + self.dp_rank * self.micro_batch
        for m in range(self.global_batch // (self.micro_batch * self.dp)):
            first = start + m * self.micro_batch * self.dp
            samples = [self.dataset[i] for i in range(first, first + self.micro_batch)]
            yield {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
