"""What a run reports: the throughput meter (tokens/s, MFU, data wait, when a heartbeat is due) and the sinks
(console, metrics.jsonl, TensorBoard, W&B; rank 0 only)."""
from __future__ import annotations

import json
import time

import torch

from gpt_simple.config import Config
from gpt_simple.eval import describe as describe_eval
from gpt_simple.run_dir import RunDir, truncate_jsonl
from gpt_simple.runtime import log
from gpt_simple.wandb_log import WandbSink, eval_scalars, scalars  # imports wandb only when a sink opens

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


def _fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ThroughputMeter:
    """Times the steps of one launch: the logging window (tokens/s, MFU, share of time waiting for data), the
    last step's duration (the stop decision budgets for one more) and when the next heartbeat is due."""

    HEARTBEAT_EVERY_S = 2.0

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float, world_size: int):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak_total = peak_flops * world_size
        self.step_seconds = 0.0
        self._last_heartbeat = 0.0
        self._step_start = 0.0
        self.reset_window()

    def reset_window(self) -> None:
        self._window_start, self._window_tokens, self._data_wait = time.perf_counter(), 0, 0.0

    def step_started(self) -> None:
        self._step_start = time.perf_counter()

    def batch_ready(self) -> None:
        self._data_wait += time.perf_counter() - self._step_start

    def step_trained(self) -> None:
        self._window_tokens += self.tokens_per_step

    def step_ended(self) -> None:
        self.step_seconds = time.perf_counter() - self._step_start

    def exclude(self, seconds: float) -> None:
        """Time spent outside training (an evaluation) does not count against the window's tokens/s."""
        self._window_start += seconds

    def window(self) -> dict:
        """tokens/s, MFU and data-wait share since the last window; starts the next one."""
        seconds = max(time.perf_counter() - self._window_start, 1e-9)
        tokens_per_s = self._window_tokens / seconds
        mfu = self.flops_per_token * tokens_per_s / self.peak_total if self.peak_total else None
        figures = {"tokens_per_s": tokens_per_s, "mfu": mfu, "data_wait_frac": self._data_wait / seconds}
        self.reset_window()
        return figures

    def heartbeat_due(self) -> bool:
        now = time.time()
        if now - self._last_heartbeat > self.HEARTBEAT_EVERY_S:
            self._last_heartbeat = now
            return True
        return False


class MetricsLogger:
    """Writes one record per logged step to every sink; resumed runs first trim records past the resume step."""

    def __init__(self, run_dir: RunDir, enabled: bool, tensorboard: bool, max_steps: int, cfg: Config | None = None):
        self.enabled, self.max_steps = enabled, max_steps
        self.path, self.tb_dir = run_dir.metrics, run_dir.tensorboard
        self.use_tb = tensorboard
        self.writer = None
        self.wandb = None  # gpt_simple.wandb_log.WandbSink when cfg.wandb.enabled (rank 0)
        if enabled and cfg is not None and cfg.wandb.enabled:
            self.wandb = WandbSink(cfg, run_dir)
        self.start = time.time()
        self.first_step = 0

    def open(self, resume_step: int) -> None:
        """Drop lines after resume_step (steps the killed job logged but never checkpointed), then append."""
        self.first_step = resume_step
        if not self.enabled:
            return
        truncate_jsonl(self.path, resume_step)
        if self.use_tb:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step hides events of replayed steps from readers, as metrics.jsonl's truncation does.
            self.writer = SummaryWriter(str(self.tb_dir), purge_step=resume_step + 1 if resume_step else None)
        if self.wandb is not None:
            self.wandb.open(resume_step)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(f"train/{key}", value, record["step"])
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log("train", record["step"], scalars("train", record))
        elapsed = time.time() - self.start
        step = record["step"]
        done = step - self.first_step
        eta = elapsed / done * (self.max_steps - step) if done > 0 else 0.0
        mfu = f"{record['mfu'] * 100:.1f}%" if record.get("mfu") is not None else "n/a"
        log.info(f"step {step}/{self.max_steps} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
                 f"{record['tokens_per_s']:,.0f} tok/s | mfu {mfu} | elapsed {_fmt_seconds(elapsed)} | "
                 f"eta {_fmt_seconds(eta)}")

    def log_eval(self, record: dict, seconds: float) -> None:
        """An evaluation record (type "eval", full precision) in metrics.jsonl, TensorBoard and the console."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            self.writer.add_scalar("eval/loss", record["loss"], record["step"])
            self.writer.add_scalar("eval/ppl", record["ppl"], record["step"])
            for bucket, value in record["loss_by_bucket"].items():
                self.writer.add_scalar(f"eval/loss_{bucket}", value, record["step"])
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log("eval", record["step"], eval_scalars(record))
        log.info(f"eval step {record['step']} | {describe_eval(record)} | {record['tokens']:,} tokens in "
                 f"{seconds:.1f}s")

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(name, step, {name: value})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb is not None:  # after the run's status is final: the sink reports it
            self.wandb.close()
            self.wandb = None
