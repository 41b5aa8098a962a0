"""`pipeline eval` and `pipeline generate` on an HF model dir (the CLI converts a Megatron checkpoint to one
first). Evaluation goes through the HF backend's own code: its blocks (SourcedBlocks: seq_len blocks
of the .bin, the same document masking), its collator, and the per-token loss table it evaluates with
during training (hf_backend.source_losses), so on the train stage's valid split it gives the train
stage's eval_loss. A source file is tokenized first by the tokenize stage's code with the model's
tokenizer (documents + EOD, as `pipeline run` writes them)."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from pipeline.data.mix import SOURCE_IDS, valid_sources
from pipeline.data.tokenizer import tokenizer_info
from pipeline.errors import ConfigError
from pipeline.formats.indexed import bin_path, idx_path
from pipeline.train.hf_backend import SourcedBlocks, collate, generate, source_losses
from pipeline.train.job import TrainJob, TrainSettings
from pipeline.train.per_source import eval_metrics, sources_summary


def load_model(ckpt: Path, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(ckpt), torch_dtype=torch.float32).to(device).eval()


def tokenize_file(path: Path, tokenizer_dir: Path, out_dir: Path) -> Path:
    """A source file (jsonl, json, parquet, txt: as data.sources.*.path) -> out_dir/eval.bin/.idx."""
    from omegaconf import OmegaConf

    from pipeline.config import SourceConfig, TokenizeConfig
    from pipeline.data.tokenize import tokenize_sources

    prefix = out_dir / "eval"
    tokenize_sources({"eval": OmegaConf.structured(SourceConfig(path=str(path)))}, tokenizer_dir, {"eval": prefix},
                     out_dir / "scratch", OmegaConf.structured(TokenizeConfig(workers=1)))
    return prefix


def data_prefix(data: Path, tokenizer_dir: Path, scratch: Path) -> Path:
    """data= as a .bin/.idx prefix: the prefix itself (or either file), else a source file, tokenized."""
    for suffix in (".bin", ".idx"):
        if data.name.endswith(suffix) and data.is_file():
            data = data.with_name(data.name[:-len(suffix)])
    if bin_path(data).is_file() and idx_path(data).is_file():
        return data
    if data.is_file():
        return tokenize_file(data, tokenizer_dir, scratch)
    raise ConfigError(f"data: {data} is neither a .bin/.idx prefix ({bin_path(data)} and {idx_path(data)}) nor a "
                      f"source file")


def evaluate(ckpt: Path, data: Path, seq_len: int, max_tokens: Optional[int] = None, batch_size: int = 8,
             document_mask: bool = True, eod_mask_loss: bool = False, device: str = "cpu") -> Dict[str, Any]:
    """Loss and perplexity of the HF model at ckpt over data's seq_len blocks (the first max_tokens' worth).
    A mix's valid split (valid.sources beside it) is also split by source, as training reports it."""
    import torch

    eod = tokenizer_info(ckpt)["eod_id"]
    job = TrainJob(eod_id=eod, train=TrainSettings(seq_len=seq_len, document_mask=document_mask,
                                                   eod_mask_loss=eod_mask_loss))
    with tempfile.TemporaryDirectory(prefix="pipeline-eval-") as scratch:
        prefix = data_prefix(Path(data), ckpt, Path(scratch))
        names: List[str] = valid_sources(prefix.parent) if prefix.name == "valid" else []
        ids = prefix.parent / SOURCE_IDS if names and bin_path(prefix.parent / SOURCE_IDS).is_file() else None
        blocks = SourcedBlocks(prefix, job, str(ids) if ids else None)
        count = len(blocks) if max_tokens is None else min(len(blocks), max_tokens // seq_len)
        if count == 0:
            raise ConfigError(f"data: {bin_path(prefix)} holds less than one block of seq_len={seq_len} tokens "
                              f"(or max_tokens is below it)")
        model = load_model(ckpt, device)
        names = names if ids else []
        total = torch.zeros(1 + max(len(names), 1), 2, dtype=torch.float64)
        with torch.no_grad():
            for start in range(0, count, batch_size):
                batch = collate([blocks[i] for i in range(start, min(start + batch_size, count))])
                sources = batch.pop("sources").to(device)
                batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
                logits = model(**batch).logits
                total += source_losses(logits, batch["labels"], sources, max(len(names), 1)).sum(0).cpu()
    metrics = eval_metrics(total, names)
    loss = metrics["eval_loss"]
    return {"checkpoint": str(ckpt), "data": str(data), "seq_len": seq_len, "blocks": count,
            "tokens": metrics["eval_tokens"], "document_mask": document_mask, "eod_mask_loss": eod_mask_loss,
            "loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "sources": sources_summary(metrics)}


def sample(ckpt: Path, prompt: str, max_new_tokens: int, samples: int = 1, temperature: float = 0.0,
           seed: int = 0, device: str = "cpu") -> List[Dict[str, Any]]:
    """`samples` continuations of prompt by the HF model at ckpt (greedy at temperature 0), through the
    generation the train stage samples with (hf_backend.generate)."""
    import torch
    from transformers import AutoTokenizer

    if samples > 1 and temperature <= 0:
        raise ConfigError(f"samples: {samples} greedy samples would all be the same; give temperature= > 0")
    torch.manual_seed(seed)
    return generate(load_model(ckpt, device), AutoTokenizer.from_pretrained(str(ckpt)), [prompt], max_new_tokens,
                    samples, temperature)
