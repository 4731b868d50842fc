"""The peak FLOP/s that MFU is measured against: a GPU's data sheet, or on a CPU the measured matmul rate."""
from __future__ import annotations

import time

import torch

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets (no sparsity).
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,   # SXM
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,
    "V100": 125e12,
}


def gpu_peak_flops(name: str) -> float | None:
    for key, flops in GPU_PEAK_FLOPS.items():  # most specific names first
        if key in name:
            return flops
    return None


def matmul_rate(m: int, k: int, n: int, repeats: int = 5) -> float:
    """The achieved fp32 FLOP/s of an (m x k) @ (k x n) product with the current thread count: the ceiling MFU
    is measured against on a CPU.

    The fastest of a few products: a busy machine (other processes, start-up of the ranks beside this one)
    only ever slows one down, and a ceiling measured too low would report an MFU above 1.
    """
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best


def peak_flops(device: torch.device, configured: float) -> tuple[float, str]:
    if configured > 0:
        return configured, "training.peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        flops = gpu_peak_flops(name)
        if flops:
            return flops, f"{name} data sheet (bf16 dense)"
        return 0.0, f"unknown GPU {name!r}: set training.peak_flops for MFU"
    # 1024^3 products: within a few % of the 2048^3 rate, at a tenth of the start-up time (~0.2 s, not 2 s)
    return matmul_rate(1024, 1024, 1024), "measured fp32 matmul rate of this CPU"
