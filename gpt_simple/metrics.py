"""Console progress, metrics.jsonl, TensorBoard scalars, tokens/s and MFU (rank 0 only)."""
from __future__ import annotations

import json
import time
from pathlib import Path

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


def measure_matmul_flops(size: int = 2048, repeats: int = 5, dtype=torch.float32) -> float:
    """The CPU's achieved fp32 matmul rate with the current thread count: the ceiling MFU is measured against.

    The fastest of a few products: a busy machine (other processes, start-up of the ranks beside this one)
    only ever slows one down, and a ceiling measured too low would report an MFU above 1.
    """
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


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
    return measure_matmul_flops(size=1024), "measured fp32 matmul rate of this CPU"


def _fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class MetricsLogger:
    """Writes one record per logged step to every sink; resumed runs first trim records past the resume step."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool, max_steps: int):
        self.enabled, self.max_steps = enabled, max_steps
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb_dir = Path(output_dir) / "tensorboard"
        self.use_tb = tensorboard
        self.writer = None
        self.start = time.time()

    def open(self, resume_step: int) -> None:
        """Drop lines after resume_step (steps the killed job logged but never checkpointed), then append."""
        if not self.enabled:
            return
        truncate_jsonl(self.path, resume_step)
        if self.use_tb:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step hides events of replayed steps from readers, as metrics.jsonl's truncation does.
            self.writer = SummaryWriter(str(self.tb_dir), purge_step=resume_step + 1 if resume_step else None)

    def log(self, record: dict, steps_done_this_launch: int, first_step: int) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(f"train/{key}", value, record["step"])
            self.writer.flush()
        elapsed = time.time() - self.start
        step = record["step"]
        done = step - first_step
        eta = elapsed / done * (self.max_steps - step) if done > 0 else 0.0
        mfu = f"{record['mfu'] * 100:.1f}%" if record.get("mfu") is not None else "n/a"
        print(f"step {step}/{self.max_steps} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
              f"{record['tokens_per_s']:,.0f} tok/s | mfu {mfu} | elapsed {_fmt_seconds(elapsed)} | "
              f"eta {_fmt_seconds(eta)}", flush=True)

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep only the records with step <= last_step (a resumed run rewrites later steps identically)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except ValueError:
            continue  # a line torn by a kill mid-write
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
