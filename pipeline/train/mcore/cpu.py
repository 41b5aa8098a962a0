"""megatron-core on a CPU-only host (gloo): the one place that redirects its CUDA assumptions.

megatron-core 0.16 is written for GPUs: it uses `torch.cuda.current_device()` as a device, keeps
CUDA RNG states in its tensor-parallel RNG tracker, calls `torch.cuda.synchronize()` and
`Tensor.cuda()`, creates some tensors with `device="cuda"` and sorts parameters by CUDA type names.
`install()` points all of these at the CPU. It is called by the megatron entry point (and the tools that
build its model: pipeline/convert/verify.py) only when `torch.cuda.is_available()` is False,
so GPU runs never touch it. Each redirection below says what it is for.
"""
from __future__ import annotations

import logging

import torch

_installed = False


# megatron-core creates small tensors with device="cuda" on the step path (schedules, grad clipping,
# optimizer, dist_checkpointing). Wrapping these factories costs only their own calls; a
# TorchFunctionMode would put a Python call in front of every op of the model.
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like",
              "full_like", "rand", "randn", "randint")


def _on_cpu(factory):
    def make(*args, **kwargs):
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return make


def install() -> None:
    """Idempotent; a no-op when CUDA is present."""
    global _installed
    if _installed or torch.cuda.is_available():
        return
    import megatron.core.tensor_parallel.random as tp_random

    torch.cuda.current_device = lambda: "cpu"  # megatron uses it as `device=`
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.Tensor.cuda = lambda self, *a, **k: self
    # megatron's optimizers sort parameters by `param.type() == 'torch.cuda.FloatTensor'` (and Half,
    # BFloat16): name CPU tensors as their CUDA twins when asked for the type string
    native_type = torch.Tensor.type

    def tensor_type(self, *args, **kwargs):
        name = native_type(self, *args, **kwargs)
        if args or kwargs or not name.startswith("torch.") or name.startswith("torch.cuda."):
            return name
        return "torch.cuda." + name[len("torch."):]

    torch.Tensor.type = tensor_type
    # the tensor-parallel RNG tracker forks "CUDA" states: fork the CPU generator instead
    tp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    # on the CPU, the "CUDA" states the tracker forks are the CPU generator's, so its check that a fork
    # left the CPU state alone always fires: drop that one message
    logging.getLogger(tp_random.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage())

    for name in _FACTORIES:
        setattr(torch, name, _on_cpu(getattr(torch, name)))
    _installed = True
