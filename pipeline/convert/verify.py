"""Same tokens through an HF model and a Megatron checkpoint (megatron-core GPTModel): max |logit
difference| and top-1 agreement.

    torchrun --nproc_per_node <tp> -m pipeline.convert.verify <hf_dir> <megatron_dir> <out.json>

The Megatron side is loaded at TP = the number of processes (PP 1), through the megatron backend's
own model builder: a torch_dist checkpoint through its checkpoint loader (any layout), a legacy one
by loading each rank's file into that rank's module with strict names and shapes (its TP must be
the number of processes). The vocab-parallel logits are gathered across TP and cut to the true
vocabulary. Rank 0 runs the HF side on the CPU in fp32 and writes the report.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.convert.megatron_io import legacy_ranks, load_legacy, read_args
from pipeline.train.job import Parallel, TrainJob, TrainSettings
from pipeline.train.mcore import checkpoint, cpu
from pipeline.train.mcore import model as models

PROMPT_TOKENS = 48
# Megatron-LM's files use Transformer Engine's names for the norms fused into the next linear layer;
# megatron-core's local layers (the CPU path) call them as below
LOCAL_NAMES = {"self_attention.linear_qkv.layer_norm_": "input_layernorm.",
               "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm."}


def to_module_names(shard, module):
    """A legacy shard's names as this module's state_dict spells them."""
    own = set(module.state_dict())
    out = {}
    for name, tensor in shard.items():
        if name not in own:
            for te, local in LOCAL_NAMES.items():
                name = name.replace(te, local)
        out[name] = tensor
    return out


def megatron_logits(ckpt_root: Path, tokens: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    path, args = read_args(ckpt_root)
    tp = dist.get_world_size()
    ps.initialize_model_parallel(tp, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    # the job of a training run at this layout, as far as building its model needs one
    parallel = Parallel(tp=tp, pp=1, vpp=None, sequence_parallel=False, distributed_optimizer=False, recompute="none")
    job = TrainJob(model=args["model"], train=TrainSettings(parallel=parallel),
                   padded_vocab_size=args["padded_vocab_size"])
    model = models.build_model(job, models.transformer_config(job, "fp32"))
    ranks = legacy_ranks(path)
    if ranks:  # a legacy file per rank: this rank's shard goes straight into the module, names checked
        if set(ranks) != {(t, 0) for t in range(tp)}:
            raise SystemExit(f"{path} is a legacy checkpoint for {len(ranks)} ranks; verify it with tp = its TP "
                             f"size and pp 1, or convert it to torch_dist first")
        shard = load_legacy(ranks[(ps.get_tensor_model_parallel_rank(), 0)])["model"]
        model[0].module.load_state_dict(to_module_names(shard, model[0].module), strict=True)
    else:
        checkpoint.load_checkpoint(path, model, None, None, {})
    model[0].eval()
    seq = tokens.shape[1]
    mask = torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(1)  # True = masked (future positions)
    with torch.no_grad():
        logits = model[0](tokens, torch.arange(seq).unsqueeze(0), mask)
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return logits[..., :args["vocab_size"]].float()


def hf_logits(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(tokens).logits.float()


def main(hf_dir: str, megatron_dir: str, out: str) -> None:
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(hf_dir).vocab_size
    tokens = torch.randint(0, vocab, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    # HF first: the CPU compatibility layer below rewires torch for megatron-core, and a transformers
    # model loaded after it gets uninitialised rotary buffers
    ours = hf_logits(hf_dir, tokens) if int(os.environ.get("RANK", "0")) == 0 else None
    cuda = torch.cuda.is_available()
    if not cuda:
        cpu.install()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    theirs = megatron_logits(Path(megatron_dir), tokens.to("cuda" if cuda else "cpu")).cpu()
    if dist.get_rank() == 0:
        report = {"max_abs_diff": float((ours - theirs).abs().max()),
                  "top1_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()),
                  "tokens": PROMPT_TOKENS, "tp": dist.get_world_size()}
        Path(out).write_text(json.dumps(report, indent=2))
        print(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
