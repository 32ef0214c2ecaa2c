"""Precision and speed accounting: autocast dtype, and the peak FLOP/s that MFU is measured against."""
from __future__ import annotations

import contextlib
import time

import torch


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """auto: bf16 on CUDA (when supported); fp32 on CPU. On this project's CPU (Zen 4, AVX-512
    BF16) bf16 autocast measured *slower* for models under ~2M parameters, where per-op casts
    cost more than the matmuls save (docs/LOG.md); ask for it with dtype=bfloat16."""
    if name == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"dtype: expected auto, float32 or bfloat16, got {name!r}")
    return table[name]


def autocast(device: str, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


_PEAK_CACHE: dict = {}


def measure_peak_flops(device: str, dtype: torch.dtype, n: int = 1024) -> float:
    """The matmul throughput this device reaches right now (best of a few n x n products):
    an honest denominator for MFU on CPUs, which have no datasheet figure per precision."""
    key = (device, dtype)
    if key not in _PEAK_CACHE:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        best = float("inf")
        for _ in range(4):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        _PEAK_CACHE[key] = 2 * n**3 / best
    return _PEAK_CACHE[key]
