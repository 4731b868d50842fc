"""Where a run's step and evaluation records go: metrics.jsonl, TensorBoard, W&B (optional) and the console.
Every sink takes the same records; the journal opens them with the step the launch resumed from, and each
makes sure a step replayed after a kill is shown once.
"""
from __future__ import annotations

import time

from gpt_simple.eval import describe as describe_eval
from gpt_simple.run_dir import RunDir, append_jsonl, truncate_jsonl
from gpt_simple.runtime import log
from gpt_simple.journal.wandb_sink import WandbSink, eval_scalars, scalars  # imports wandb only when a sink opens


class JsonlSink:
    """metrics.jsonl: one line per logged step and per evaluation, stamped with the wall-clock time; a resumed
    launch first drops the lines past its checkpoint (steps the killed job logged and this one trains again,
    identically)."""

    def __init__(self, run_dir: RunDir):
        self.path = run_dir.metrics

    def open(self, resume_step: int) -> int:
        """Returns the highest step an earlier launch logged past `resume_step` (0: none)."""
        return truncate_jsonl(self.path, resume_step)

    def train(self, record: dict) -> None:
        append_jsonl(self.path, {**record, "time": time.time()})  # wall-clock: the report's loss against time

    def eval(self, record: dict) -> None:
        append_jsonl(self.path, {**record, "time": time.time()})

    def scalar(self, name: str, value: float, step: int) -> None:
        pass  # checkpoint timings are in events.jsonl's save records

    def close(self) -> None:
        pass


class TensorBoardSink:
    """tensorboard/: the same scalars. Every launch opens its writer with purge_step = resume step + 1 (also a
    launch from step 0: a job killed before its first checkpoint logged steps that the next one logs again), so
    TensorBoard's readers drop the replayed steps of earlier event files."""

    def __init__(self, run_dir: RunDir):
        self.dir, self.writer = run_dir.tensorboard, None

    def open(self, resume_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(self.dir), purge_step=resume_step + 1)

    def train(self, record: dict) -> None:
        for key, value in scalars("train", record).items():
            self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def eval(self, record: dict) -> None:
        for key, value in eval_scalars(record).items():
            if key != "eval/tokens":
                self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def scalar(self, name: str, value: float, step: int) -> None:
        self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ConsoleSink:
    """The progress line of each logged step (with the launch's ETA) and of each evaluation."""

    def __init__(self, max_steps: int):
        self.max_steps, self.start, self.first_step = max_steps, time.time(), 0

    def open(self, resume_step: int) -> None:
        self.first_step = resume_step

    def train(self, record: dict) -> None:
        elapsed = time.time() - self.start
        step = record["step"]
        done = step - self.first_step
        eta = elapsed / done * (self.max_steps - step) if done > 0 else 0.0
        mfu = f"{record['mfu'] * 100:.1f}%" if record.get("mfu") is not None else "n/a"
        log.info(f"step {step}/{self.max_steps} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
                 f"{record['tokens_per_s']:,.0f} tok/s | mfu {mfu} | elapsed {_fmt_seconds(elapsed)} | "
                 f"eta {_fmt_seconds(eta)}")

    def eval(self, record: dict, seconds: float = 0.0) -> None:
        log.info(f"eval step {record['step']} | {describe_eval(record)} | {record['tokens']:,} tokens in "
                 f"{seconds:.1f}s")


def metric_sinks(cfg, run_dir: RunDir) -> list:
    sinks = [JsonlSink(run_dir)]
    if cfg.training.tensorboard:
        sinks.append(TensorBoardSink(run_dir))
    if cfg.wandb.enabled:
        sinks.append(WandbSink(cfg, run_dir))
    return sinks
