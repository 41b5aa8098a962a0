"""Run under torchrun (gloo, CPU, 4 ranks) by tests/e2e/test_megatron_lm_checkpoints.py: writes checkpoints
the way Megatron-LM writes them, from megatron-core GPTModels built and saved by megatron-core itself,
and loads one of our legacy outputs back into megatron-core's local-spec GPTModel.

    torchrun --nproc_per_node 4 megatron_lm_writer.py <out dir> <tokens.pt> <our legacy tp2 pp2 dir>

Each fixture `<out>/<name>/` holds a checkpoint dir `ckpt/` and `logits.pt`, megatron-core's logits for the
tokens (gathered over TP, from the last pipeline stage). The model is built from Megatron-LM's args as
Megatron-LM's core_transformer_config_from_args does; `args` in the files is that argparse.Namespace.
torch_dist: `dist_checkpointing.save(model.sharded_state_dict(metadata=...))` with the common state
Megatron-LM saves. legacy: `torch.save` of Megatron-LM's generate_state_dict layout by each DP-rank-0
rank into iter_XXXXXXX/mp_rank_TT[_PPP]/model_optim_rng.pt. `<out>/ours.json` says whether our legacy
output loaded strictly and its logits.
"""
import argparse
import dataclasses
import io
import json
import random
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnBackend

from pipeline.train.mcore import cpu

PADDED = 256  # padded_vocab_size; the true vocab (250) is the test's
BASE = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, group_query_attention=True,
            num_query_groups=2, kv_channels=16, max_position_embeddings=128, seq_length=128,
            position_embedding_type="rope", rotary_base=10000, rotary_percent=1.0, normalization="RMSNorm",
            norm_epsilon=1e-5, swiglu=True, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False,
            untie_embeddings_and_output_weights=True, padded_vocab_size=PADDED, make_vocab_size_divisible_by=128,
            tokenizer_type="HuggingFaceTokenizer", transformer_impl="local", attention_backend=AttnBackend.auto,
            use_legacy_models=False, openai_gelu=False, apply_layernorm_1p=False, num_experts=None,
            data_parallel_random_init=False, sequence_parallel=False, context_parallel_size=1,
            expert_model_parallel_size=1, micro_batch_size=1, global_batch_size=8, lr=3e-4, seed=1234,
            consumed_train_samples=0, no_save_optim=False, no_save_rng=False)
GPT2 = dict(position_embedding_type="learned_absolute", normalization="LayerNorm", swiglu=False, add_bias_linear=True,
            group_query_attention=False, num_query_groups=None, ffn_hidden_size=256,
            untie_embeddings_and_output_weights=False)
# name: (Megatron-LM args, tp, pp, vpp, format, what else the fixture does)
FIXTURES = {
    # llama, local-spec norm names as its state_dict_for_save_checkpoint gives them, _extra_state None
    "legacy_tp2": (dict(), 2, 1, None, "torch", {}),
    # qwen2 (q/k/v bias), tied, virtual pipeline (model0/model1), norms renamed to TE's, `release` tracker
    "legacy_pp2_vpp2": (dict(add_qkv_bias=True, untie_embeddings_and_output_weights=False, num_layers=4), 1, 2, 2,
                        "torch", {"te_names": True, "release": True}),
    # qwen3 (qk norm), layers stacked under one key, every key under `module.`
    "dist_tp2_module": (dict(qk_layernorm=True, kv_channels=32), 2, 1, None, "torch_dist", {"prefix": "module."}),
    # llama: Megatron-LM's singleton_local_shards: one key per layer and fc1 as `_w`/`_v` halves; bf16
    "dist_split_bf16": (dict(), 2, 1, None, "torch_dist", {"metadata": {"singleton_local_shards": True},
                                                            "bf16": True}),
    # gpt2 (LayerNorm, biases, learned positions, exact GELU), tied, pp 2, one key per layer
    "dist_pp2_gpt2": (GPT2, 1, 2, None, "torch_dist", {"metadata": {"non_homogeneous_layers": True}}),
}


def config_from_args(a):
    """Megatron-LM's core_transformer_config_from_args, for the args these fixtures set."""
    act = torch.nn.functional.silu if a.swiglu else torch.nn.functional.gelu
    return TransformerConfig(
        num_layers=a.num_layers, hidden_size=a.hidden_size, ffn_hidden_size=a.ffn_hidden_size,
        num_attention_heads=a.num_attention_heads, kv_channels=a.kv_channels,
        num_query_groups=a.num_query_groups if a.group_query_attention else None, layernorm_epsilon=a.norm_epsilon,
        normalization=a.normalization, gated_linear_unit=a.swiglu, activation_func=act,
        add_bias_linear=a.add_bias_linear, add_qkv_bias=a.add_qkv_bias, qk_layernorm=a.qk_layernorm,
        hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=a.tensor_model_parallel_size,
        pipeline_model_parallel_size=a.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=a.virtual_pipeline_model_parallel_size,
        params_dtype=torch.float32, pipeline_dtype=torch.float32, bias_activation_fusion=False,
        masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False)


def build(a):
    """This rank's model chunks, as Megatron-LM's get_model builds them (local spec: no TE on the CPU)."""
    config = config_from_args(a)
    spec = get_gpt_layer_local_spec(normalization=a.normalization, qk_layernorm=a.qk_layernorm)
    vpp = a.virtual_pipeline_model_parallel_size
    chunks = []
    for v in range(vpp or 1):
        stage = v if vpp else None
        chunks.append(GPTModel(
            config=config, transformer_layer_spec=spec, vocab_size=a.padded_vocab_size,
            max_sequence_length=a.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=not a.untie_embeddings_and_output_weights,
            position_embedding_type=a.position_embedding_type, rotary_base=a.rotary_base, vp_stage=stage).eval())
    return chunks


def perturb(chunks):
    """Norm weights and biases away from their 1 / 0 init, so a norm or bias mapped wrong shows in the logits;
    the same values on every TP rank for a replicated one."""
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    with torch.no_grad():
        for v, chunk in enumerate(chunks):
            for name, p in chunk.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    split = getattr(p, "tensor_model_parallel", False)
                    g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{pp_rank}/{v}/{tp_rank * split}".encode()))
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5 if p.dim() == 1 and "norm" in name
                            else torch.randn(p.shape, generator=g) * 0.02)


def forward(chunks, tokens):
    """Logits through the pipeline by hand (stage to stage with send/recv, chunk by chunk with virtual
    stages), gathered over TP; on the last pipeline rank, None elsewhere."""
    pp, me = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    seq = tokens.shape[1]
    position = torch.arange(seq).unsqueeze(0)
    mask = torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(1)  # True = masked (future)
    hidden, hidden_size = None, chunks[0].config.hidden_size
    steps = [(v, p) for v in range(len(chunks)) for p in range(pp)]
    for i, (v, p) in enumerate(steps):
        last = i == len(steps) - 1
        if p == me:
            if i:
                chunks[v].set_input_tensor(hidden)
            with torch.no_grad():
                out = chunks[v](tokens, position, mask)
            if last:
                return tensor_parallel.gather_from_tensor_model_parallel_region(out).float()
            dist.send(out.contiguous(), ps.get_pipeline_model_parallel_next_rank())
        elif (p + 1) % pp == me and not last:
            hidden = torch.empty(seq, 1, hidden_size)
            dist.recv(hidden, ps.get_pipeline_model_parallel_prev_rank())
    return None


def rng_state():
    """Megatron-LM's get_rng_state (numpy's state included)."""
    return {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.get_rng_state(),
            "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}


def te_named(state):
    """A local-spec state dict as Transformer Engine's spec names it: norms fused into the next linear
    layer, and TE's serialized extra state, also for its core attention: an io.BytesIO from
    older TE for the linear layers, a uint8 tensor from newer TE for the attention."""
    out = {}
    for k, t in state.items():
        k = k.replace("input_layernorm.", "self_attention.linear_qkv.layer_norm_").replace(
            "pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_")
        out[k] = io.BytesIO(b"\x80\x02}q\x00.") if k.endswith("_extra_state") else t  # TE torch.save()s a dict
        if k.endswith("self_attention.linear_proj._extra_state"):
            out[k.replace("linear_proj", "core_attention")] = torch.empty(0, dtype=torch.uint8)
    return out


def write(name, args, tp, pp, vpp, fmt, opts):
    ps.initialize_model_parallel(tp, pp, vpp)
    tensor_parallel.model_parallel_cuda_manual_seed(zlib.crc32(name.encode()))
    torch.manual_seed(zlib.crc32(name.encode()))
    vpp_layers = args["num_layers"] // (pp * vpp) if vpp else None
    a = argparse.Namespace(**{**BASE, **args}, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                           virtual_pipeline_model_parallel_size=vpp, num_layers_per_virtual_pipeline_stage=vpp_layers,
                           ckpt_format=fmt, use_dist_ckpt=fmt != "torch", bf16=opts.get("bf16", False), fp16=False,
                           params_dtype=torch.bfloat16 if opts.get("bf16") else torch.float32, iteration=7)
    chunks = build(a)
    perturb(chunks)
    if opts.get("bf16"):  # the fp32 reference runs on the weights the bf16 checkpoint holds
        with torch.no_grad():
            for chunk in chunks:
                for p in chunk.parameters():
                    p.copy_(p.bfloat16().float())
    logits = forward(chunks, TOKENS)
    folder = OUT / name
    root = folder / "ckpt"
    iteration_dir = root / ("release" if opts.get("release") else "iter_0000007")
    if dist.get_rank() == 0:
        iteration_dir.mkdir(parents=True)
    dist.barrier()
    if logits is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        torch.save(logits, folder / "logits.pt")
    if opts.get("bf16"):
        chunks = [chunk.bfloat16() for chunk in chunks]
    common = {"args": a, "checkpoint_version": 3.0, "iteration": 7,
              "opt_param_scheduler": {"max_lr": 3e-4, "num_steps": 56}, "num_floating_point_operations_so_far": 0}
    if fmt == "torch_dist":
        state = dict(common)
        for v, chunk in enumerate(chunks):
            state["model" if len(chunks) == 1 else f"model{v}"] = chunk.sharded_state_dict(
                prefix=opts.get("prefix", ""), metadata=opts.get("metadata"))
        first = next(t for t in state["model"].values() if getattr(t, "key", "").endswith("word_embeddings.weight")
                     ) if chunks[0].pre_process else None
        if first is not None:  # an optimizer state tensor beside the model's, as the distributed optimizer saves
            state["optimizer"] = {"state": {"exp_avg": dataclasses.replace(
                first, key="optimizer.state.exp_avg." + first.key, data=torch.zeros_like(first.data))}}
        at = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank())
        state["rng_state"] = ShardedObject("rng_state", [rng_state()], (pp, tp), at,
                                           replica_id=ps.get_data_parallel_rank())
        dist_checkpointing.save(state, str(iteration_dir), content_metadata=opts.get("metadata"))
    elif ps.get_data_parallel_rank() == 0:
        state = dict(common)
        for v, chunk in enumerate(chunks):
            model = chunk.state_dict_for_save_checkpoint()
            state["model" if len(chunks) == 1 else f"model{v}"] = te_named(model) if opts.get("te_names") else model
        state["optimizer"] = {"optimizer": {"state": {0: {"exp_avg": torch.zeros(3), "step": torch.tensor(56.0)}},
                                            "param_groups": [{"lr": 3e-4, "params": [0]}]},
                              "fp32_from_fp16_params": [[torch.zeros(3)]]}
        state["rng_state"] = [rng_state()]
        rank = f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}" + (
            f"_{ps.get_pipeline_model_parallel_rank():03d}" if pp > 1 else "")
        (iteration_dir / rank).mkdir()
        torch.save(state, iteration_dir / rank / "model_optim_rng.pt")
    dist.barrier()
    if dist.get_rank() == 0:
        (root / "latest_checkpointed_iteration.txt").write_text("release" if opts.get("release") else "7")
    ps.destroy_model_parallel()


def load_ours(root: Path):
    """Our legacy tp2 pp2 transformer_impl=local output into megatron-core's local-spec GPTModel of each
    rank, strictly, and its logits; the architecture from the Megatron-LM args stored in it."""
    ps.initialize_model_parallel(2, 2)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    tracker = (root / "latest_checkpointed_iteration.txt").read_text().strip()
    rank = f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}_{ps.get_pipeline_model_parallel_rank():03d}"
    stored = torch.load(root / f"iter_{int(tracker):07d}" / rank / "model_optim_rng.pt", weights_only=False)
    a = stored["args"]
    chunk = build(a)[0]
    problem = None
    try:
        chunk.load_state_dict(stored["model"], strict=True)
    except RuntimeError as e:
        problem = str(e)
    logits = forward([chunk], TOKENS)
    if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
        torch.save(logits, OUT / "ours_logits.pt")
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    if dist.get_rank() == 0:
        (OUT / "ours.json").write_text(json.dumps({"strict_problems": problems}))
    ps.destroy_model_parallel()


if __name__ == "__main__":  # dist_checkpointing's writer processes import this module again
    OUT, TOKENS = Path(sys.argv[1]), torch.load(sys.argv[2])
    cpu.install()
    dist.init_process_group("gloo")
    for fixture, spec in FIXTURES.items():
        write(fixture, *spec)
    load_ours(Path(sys.argv[3]))
    dist.barrier()
    dist.destroy_process_group()
