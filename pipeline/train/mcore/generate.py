"""Greedy samples from the megatron-core model at each evaluation (rows as hf_backend.generate's, written by
tracking.RunLog.samples). No KV cache: each new token is a full forward of the growing sequence, which is
cheap for short prompts and train.sample_tokens (16) new tokens."""
from __future__ import annotations

from typing import List, Optional

import torch

from pipeline.train.job import TrainJob


class Sampler:
    """train.sample_prompts, tokenized once with the run's tokenizer (identically on every rank)."""

    def __init__(self, job: TrainJob):
        from transformers import AutoTokenizer

        self.job = job
        self.tokenizer = AutoTokenizer.from_pretrained(job.tokenizer_dir)
        self.prompts = [(p, self.tokenizer(p).input_ids) for p in job.train.sample_prompts]
        par = job.train.parallel
        # a forward across pipeline stages (P2P per token) is not built: say so once, run no collective
        self.skip = par.pp > 1 or bool(par.vpp)

    def rows(self, model: List[torch.nn.Module]) -> Optional[list]:
        """Every rank runs the same loop (TP's collectives need the whole group); None when skipped."""
        if self.skip or not self.prompts:
            return None
        chunk = model[0]
        chunk.eval()
        rows = [{"prompt": p, "sample": 0, "text": self.tokenizer.decode(self.continue_ids(chunk, ids),
                                                                         skip_special_tokens=True)}
                for p, ids in self.prompts]
        chunk.train()
        return rows

    def continue_ids(self, chunk: torch.nn.Module, ids: List[int]) -> List[int]:
        from megatron.core import tensor_parallel

        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        par = self.job.train.parallel
        # sequence parallelism splits the sequence over TP: pad it on the right (causal, so the padding
        # never reaches the positions read)
        multiple = par.tp if par.sequence_parallel else 1
        eos = self.job.eod_id
        out = list(ids) or [eos]  # an empty prompt continues from a document boundary
        new = []
        with torch.no_grad():
            for _ in range(self.job.train.sample_tokens):
                n = len(out)
                size = -(-n // multiple) * multiple
                tokens = torch.tensor([out + [eos] * (size - n)], device=device)
                mask = torch.ones(1, 1, size, size, dtype=torch.bool, device=device).triu(1)  # True = masked
                logits = chunk(tokens, torch.arange(size, device=device).unsqueeze(0), mask)
                logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
                token = int(logits[0, n - 1, :self.job.vocab_size].argmax())
                if token == eos:  # the document ends, as HF's generate stops at EOS
                    break
                out.append(token)
                new.append(token)
        return new
