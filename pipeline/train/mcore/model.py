"""The megatron backend's model: each family in megatron-core terms, its TransformerConfig, the layer
spec and one GPTModel chunk per virtual pipeline stage in megatron-core's DDP."""
from __future__ import annotations

from functools import partial
from typing import List, Mapping, Union

import torch

from pipeline.models import by_name
from pipeline.models.hf_config import ffn_size, head_dim
from pipeline.train.job import TrainJob
from pipeline.train.passthrough import fields_of

# What each family is in megatron-core terms (TransformerConfig fields + GPTModel arguments) is its table's
# `megatron` (pipeline/models/<family>.py). gpt2 uses the tanh GELU ("gelu_new") so its logits match HF's.
ACTIVATIONS = {"silu": torch.nn.functional.silu,
               "gelu_tanh": partial(torch.nn.functional.gelu, approximate="tanh")}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RECOMPUTE = {"none": {}, "selective": dict(recompute_granularity="selective"),
             "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)}
# train.attention -> megatron-core's AttnBackend: it picks Transformer Engine's kernel (with the local
# spec, on CPU, attention is megatron-core's own unfused one whatever it says)
ATTENTION = {"sdpa": "auto", "eager": "unfused", "flash": "flash"}


def transformer_config(job: Union[TrainJob, Mapping], precision: str):
    """The pipeline's TransformerConfig, then the train.megatron_args entries that are its fields."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnBackend

    job = TrainJob.of(job)
    model, par, fam = job.model, job.train.parallel, by_name(job.model["family"]).megatron
    dtype = DTYPES[precision]
    return TransformerConfig(**{**dict(
        num_layers=model["num_layers"],
        hidden_size=model["hidden_size"],
        num_attention_heads=model["num_attention_heads"],
        num_query_groups=model["num_key_value_heads"] or model["num_attention_heads"],
        kv_channels=head_dim(model),
        qk_layernorm=fam["qk_layernorm"],
        ffn_hidden_size=ffn_size(model),
        normalization=fam["normalization"],
        layernorm_epsilon=model["norm_eps"],
        gated_linear_unit=fam["gated_linear_unit"],
        activation_func=ACTIVATIONS[fam["activation"]],
        add_bias_linear=fam["add_bias_linear"],
        add_qkv_bias=fam["add_qkv_bias"],
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp,
        sequence_parallel=par.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # the fused kernels are CUDA/apex/TE only; on a GPU megatron-core picks them when they exist
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        # the interleaved schedule's P2P as Megatron-LM sets it: overlapped, unbatched. Batched, two
        # pipeline ranks exchange activations and gradients over one pair in mismatched order
        overlap_p2p_comm=par.vpp is not None,
        batch_p2p_comm=par.vpp is None,
        attention_backend=AttnBackend[ATTENTION[job.train.attention]],
        **RECOMPUTE[job.train.recompute],
    ), **fields_of(TransformerConfig, job.train.megatron_args)})


def uses_te() -> bool:
    """Whether layer_spec picks Transformer Engine's layers: a GPU and TE present."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    return torch.cuda.is_available() and specs.HAVE_TE


def layer_spec(normalization: str, qk_layernorm: bool = False):
    """Transformer Engine's fused layers where TE and a GPU are present (Megatron-LM's default),
    megatron-core's local layers otherwise. The local spec maps its norm names onto TE's, so both
    save the same checkpoint keys."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if uses_te():
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    return specs.get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm)


def rope_scaling(model: Mapping) -> dict:
    """GPTModel's argument for model.rope_scaling: linear is megatron-core's position interpolation
    (positions / factor, as HF divides the frequencies); llama3 is applied to the frequencies after
    construction (scale_llama3), since GPTModel's own rope_scaling takes the factor only."""
    if model.get("rope_scaling", "none") == "linear":
        return dict(seq_len_interpolation_factor=model["rope_scaling_factor"])
    return {}


def scale_llama3(chunk, model: Mapping) -> None:
    """Llama 3.1's frequency scaling, with every parameter of model.*, by megatron-core's own formula."""
    if model.get("rope_scaling", "none") != "llama3":
        return
    rotary = chunk.rotary_pos_emb
    rotary.inv_freq = rotary._apply_scaling(
        rotary.inv_freq, factor=model["rope_scaling_factor"], low_freq_factor=model["rope_low_freq_factor"],
        high_freq_factor=model["rope_high_freq_factor"],
        original_max_position_embeddings=model["rope_original_max_position_embeddings"])


def build_model(job: Union[TrainJob, Mapping], config) -> List[torch.nn.Module]:
    """One GPTModel chunk per virtual pipeline stage of this rank, each wrapped in megatron-core's DDP."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel

    job = TrainJob.of(job)
    model, fam = job.model, by_name(job.model["family"]).megatron
    spec = layer_spec(fam["normalization"], fam["qk_layernorm"])
    vpp = job.train.parallel.vpp
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        chunk = GPTModel(
            config=config, transformer_layer_spec=spec, vocab_size=job.padded_vocab_size,
            max_sequence_length=model["max_position_embeddings"],
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=model["tie_word_embeddings"],
            position_embedding_type=fam["position_embedding_type"], rotary_base=int(model["rope_theta"]),
            vp_stage=stage, **rope_scaling(model))
        scale_llama3(chunk, model)
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        ddp_config = DistributedDataParallelConfig(**{
            "grad_reduce_in_fp32": True, "use_distributed_optimizer": job.train.parallel.distributed_optimizer,
            **fields_of(DistributedDataParallelConfig, job.train.megatron_args)})
        # chunks after the first own no bucket of the first's: megatron-LM disables bucketing there too
        chunks.append(DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                              disable_bucketing=vp_stage > 0))
    return chunks
