"""Holding the real trainer at its step boundary, so that it can take turns with other work, without changing
the trainer: StepGate stands in for Trainer.agree (the step boundary's agreement), the first thing of every step
of Trainer.run_loop.

In one process (bench/throughput.py) the work in between is a function. Across processes:

    python bench/gate.py --control DIR [train.py's arguments]          (or under torchrun)

runs Trainer.run_loop exactly as train.py builds and runs it, except that before step k+1 rank 0 waits until
DIR/go-<k+1> exists; the other ranks wait meanwhile inside the step's stop agreement (an all-reduce). DIR/stop
makes rank 0 write the run's STOP file, so every rank agrees to stop at that boundary, as `gpt-simple stop`
does. The gate restarts the trainer's metrics window after the wait, so the run's own per-step tokens_per_s
(metrics.jsonl, log_steps = 1) covers its step only. GatedRun is the driving side.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.launch import BENCH_CONFIG, TrainRun  # noqa: E402
from bench.models import load, trainer_in_process  # noqa: E402

POLL_S = 0.005
IDLE_TIMEOUT_S = 1800  # no word from the driver for this long (it died): stop


class StepGate:
    """At each step boundary: record the time of the step just finished, run `between(k)` (k = steps done so
    far), restart the trainer's metrics window, then run the real agreement. After `steps` the agreed votes
    say "stop file" (the loop ends as `gpt-simple stop` ends it) and `done` is set."""

    def __init__(self, trainer, between, steps: int):
        self.trainer, self.between, self.steps = trainer, between, steps
        self.check = trainer.agree
        trainer.agree = self  # run_loop calls self.agree(): the instance attribute wins
        self.samples: list[float] = []
        self.mark: float | None = None
        self.done = False

    def __call__(self):
        now = time.perf_counter()
        if self.mark is not None:
            self.samples.append(now - self.mark)
        if len(self.samples) >= self.steps:
            self.done = True
            return dataclasses.replace(self.check(), stop_file=True)
        self.between(len(self.samples))
        self.trainer.meter.reset_window()
        self.mark = time.perf_counter()
        return self.check()


def worker(argv: list[str], at_boundary=None) -> int:
    """`at_boundary(trainer, k)`, if given, runs on every rank at each step boundary (k steps done) before the
    wait: a benchmark's own probe (bench/hsdp.py counts the collectives of one step)."""
    from gpt_simple.run_dir import RunDir
    p = argparse.ArgumentParser(description="the trainer, held at each step boundary until told to go on")
    p.add_argument("--control", required=True)
    p.add_argument("--config", default=str(BENCH_CONFIG))
    a, overrides = p.parse_known_args(argv)
    cfg = load(Path(a.config), overrides)
    control = Path(a.control)
    with trainer_in_process(cfg) as trainer:
        stop_file = RunDir(cfg.training.output_dir).stop

        def between(k: int) -> None:
            if at_boundary is not None:
                at_boundary(trainer, k)
            if not trainer.dist.is_main:
                return
            deadline = time.time() + IDLE_TIMEOUT_S
            while not (control / f"go-{k + 1}").exists():
                if (control / "stop").exists() or time.time() > deadline:
                    stop_file.touch()
                    return
                time.sleep(POLL_S)

        StepGate(trainer, between, cfg.training.max_steps + 1)
        trainer.run_loop()
    return 0


class GatedRun:
    """A bench/gate.py run (1 process or torchrun), advanced one step at a time by the caller."""

    def __init__(self, out: Path, overrides: list[str], nproc: int, threads: int, name: str,
                 script: Path = Path(__file__).resolve(), args: list[str] = ()):
        """`script`: a worker that calls gate.worker (with its own `at_boundary`) and takes `args` too."""
        self.control = out.parent / f"{out.name}-control"
        self.control.mkdir(parents=True, exist_ok=True)
        self.run = TrainRun(out, ["--training.max_steps", "1000000", "--training.log_steps", "1",
                                  "--training.save_steps", "0", *overrides], nproc=nproc, threads=threads,
                            name=name, script=script, args=[*args, "--control", str(self.control)])
        self.step = 0

    def start(self) -> "GatedRun":
        self.run.start()
        return self

    def advance(self, timeout: float = 900) -> dict:
        """Let it take one step; its metrics record for that step (tokens_per_s: the step alone)."""
        self.step += 1
        (self.control / f"go-{self.step}").touch()
        return self.run.wait_step(self.step, timeout)

    def stop(self) -> None:
        (self.control / "stop").touch()
        try:
            if self.run.alive():
                self.run.wait_exit(timeout=120)
        except Exception:  # noqa: BLE001 - it is killed below either way
            pass
        finally:
            self.run.kill()


if __name__ == "__main__":
    from gpt_simple.cli import exit_now
    exit_now(worker(sys.argv[1:]))  # as train.py ends: no interpreter teardown per rank
