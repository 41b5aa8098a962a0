#!/usr/bin/env python3
"""Step time of the HF backend with train.document_mask on and off, on this machine's CPU.

    .venv/bin/python scripts/document_mask_cost.py [--seq-lens 128 512] [--steps 20] [--rounds 3] [--threads 1]

The tiny_llama model (configs/model/tiny_llama.yaml, built by hf_backend.build_model) trains on blocks
of a synthetic token stream (documents of lognormal length, median 200 tokens, EOD after each) read
through the backend's own DocumentBlocks and collate, micro batch 4: forward, backward and an AdamW
step per batch, as the Trainer does them but without its bookkeeping. On and off alternate each round,
so machine noise hits both alike; the first 3 steps of each timed run are warm-up. A step's time is this
process's CPU time (time.process_time, one torch thread by default), so other jobs on a shared machine
do not inflate it. Prints the median step time of each and the ratio.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ModelConfig
from pipeline.formats.indexed import IndexedWriter
from pipeline.train.hf_backend import DocumentBlocks, build_model, collate
from pipeline.train.job import TrainJob, TrainSettings

VOCAB, EOD, MICRO, WARMUP = 1024, 0, 4, 3
MODEL = ModelConfig(family="llama", hidden_size=64, num_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    ffn_hidden_size=176, max_position_embeddings=512)


def synthetic_stream(prefix: Path, tokens: int) -> float:
    """Documents of lognormal length (median 200) closed by EOD; returns their mean length."""
    rng = np.random.default_rng(0)
    lengths = np.maximum(rng.lognormal(np.log(200), 0.8, tokens // 100).astype(np.int64), 1)
    lengths = lengths[:np.searchsorted(np.cumsum(lengths + 1), tokens) + 1] + 1
    body = rng.integers(1, VOCAB, int(lengths.sum()))
    body[np.cumsum(lengths) - 1] = EOD
    writer = IndexedWriter(prefix, np.uint16)
    writer.add(body, lengths)
    writer.finish()
    return float(lengths.mean())


def step_times(model, optimizer, data: DocumentBlocks, steps: int) -> list:
    times = []
    for s in range(steps + WARMUP):
        batch = collate([data[(s * MICRO + i) % len(data)] for i in range(MICRO)])
        started = time.process_time()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.process_time() - started)
    return times[WARMUP:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "train"
        mean_doc = synthetic_stream(prefix, 400_000)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU time per step; documents of "
              f"{mean_doc:.0f} tokens on average; micro batch {MICRO}, {args.steps} steps x {args.rounds} rounds")
        for seq in args.seq_lens:
            jobs = {mask: TrainJob(model=dataclasses.asdict(MODEL), vocab_size=VOCAB, eod_id=EOD,
                                   train=TrainSettings(seq_len=seq, document_mask=mask)) for mask in (True, False)}
            model = build_model(jobs[True]).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            data = {mask: DocumentBlocks(prefix, job) for mask, job in jobs.items()}
            times = {True: [], False: []}
            for _ in range(args.rounds):
                for mask in (True, False):
                    times[mask] += step_times(model, optimizer, data[mask], args.steps)
            on, off = (statistics.median(times[m]) * 1e3 for m in (True, False))
            print(f"seq_len {seq}: document_mask on {on:.1f} ms/step, off {off:.1f} ms/step, "
                  f"on/off {on / off:.2f}")


if __name__ == "__main__":
    main()
