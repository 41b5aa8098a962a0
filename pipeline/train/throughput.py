"""TFLOP/s and MFU of a training step, the same way on both backends.

Model FLOPs per token come from the model's family (pipeline/models/<family>.py `flops`, counted as
Megatron-LM counts them); a step's achieved TFLOP/s per device is tokens/s x FLOPs per token / devices.
MFU is that over the device's dense bf16 peak: `train.peak_tflops` when set, else the table below by
the CUDA device's name, else unknown (None: on the CPU, or a GPU not in the table), and then no MFU is
reported rather than a made-up one.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from pipeline.models import by_name

# dense bf16 peak TFLOP/s by a substring of torch.cuda.get_device_name(), first match wins (the
# vendors' datasheets, without sparsity). PCIe/NVL parts run at lower clocks than SXM, so they come first.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
)


def flops_per_token(model: Mapping[str, Any], vocab: int, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of the model at this context."""
    return by_name(model["family"]).flops(model, vocab, seq_len)


def device_peak(override: Optional[float] = None) -> Optional[float]:
    """Dense bf16 peak TFLOP/s of one device: the override, the table's for this GPU, or None."""
    if override:
        return float(override)
    import torch

    if not torch.cuda.is_available():
        return None
    return peak_of(torch.cuda.get_device_name())


def peak_of(device_name: str) -> Optional[float]:
    return next((peak for key, peak in PEAK_TFLOPS if key in device_name), None)


def step_throughput(tokens_per_second: float, flops_token: float, devices: int,
                    peak: Optional[float]) -> Dict[str, Optional[float]]:
    """{"tflops_per_device", "mfu"} of a step; mfu is None when the peak is unknown."""
    tflops = tokens_per_second * flops_token / max(devices, 1) / 1e12
    return {"tflops_per_device": significant(tflops), "mfu": significant(tflops / peak) if peak else None}


def significant(x: float, digits: int = 4) -> float:
    """x to `digits` significant digits: a CPU's 0.0025 TFLOP/s and a GPU's 412.3 both stay readable."""
    return float(f"{x:.{digits}g}")


class Meter:
    """A run's throughput, the same on both backends: each measured interval's tokens/s, TFLOP/s per
    device and MFU (None kept out), and the run's mean over every interval but the first, which pays
    for start-up (allocation, kernel selection, the first collective)."""

    def __init__(self, model: Mapping[str, Any], vocab: int, seq_len: int, devices: int,
                 peak_override: Optional[float] = None):
        self.flops_token = flops_per_token(model, vocab, seq_len)
        self.devices, self.peak = devices, device_peak(peak_override)
        self.intervals, self.tokens, self.seconds = 0, 0.0, 0.0

    def measure(self, tokens: float, seconds: float) -> Dict[str, float]:
        if self.intervals:
            self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds
        self.intervals += 1
        return self._row(tokens / max(seconds, 1e-9))

    def summary(self) -> Dict[str, float]:
        """The mean over the run (this process's part of it; a single interval when that is all there is)."""
        return self._row(self.tokens / self.seconds) if self.seconds else {}

    def _row(self, rate: float) -> Dict[str, float]:
        row = {"tokens_per_second": round(rate, 1), **step_throughput(rate, self.flops_token, self.devices, self.peak)}
        return {k: v for k, v in row.items() if v is not None}
