"""2-rank FSDP2 on one CPU against one process: `torchrun --nproc_per_node 2 train.py` (gloo, 1 thread per
rank) against `python train.py` (2 threads), the real train.py on configs/bench.toml, same global batch.

    python bench/fsdp2.py [--quick | --smoke] [--json PATH]

Two launches cannot take turns within one process, so they run one after the other, each alone on the
machine: one process, two ranks, two ranks, one process (ABBA, so that a drift in the machine's speed hits
both alike; --quick and --smoke run AB). A launch's figure is train.py's own per-step tokens_per_s from its
metrics.jsonl (log_steps = 1), after the warm-up steps. The ratio is what data parallelism costs when the
"network" (gloo over loopback) and the compute share the same cores; it says nothing about multi-GPU scaling.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cli import Mode, main_for  # noqa: E402
from bench.launch import TrainRun, scratch_dir  # noqa: E402
from bench.stats import fmt, median, spread  # noqa: E402
from bench.table import row  # noqa: E402


def launch(root: Path, mode: Mode, nproc: int, i: int, steps: int, warmup: int) -> list[float]:
    """One launch to completion; its tokens/s for each step after `warmup`."""
    run = TrainRun(root / f"{nproc}-ranks-{i}", ["--training.max_steps", str(warmup + steps), "--training.log_steps",
                                                 "1", "--training.save_steps", "0", *mode.overrides()],
                   nproc=nproc, threads=mode.threads(nproc), name=f"train.py x{nproc}")
    try:
        run.start().finish()
    finally:
        run.kill()
    return [r["tokens_per_s"] for r in run.metrics() if r["step"] > warmup]


def run(mode: Mode = Mode()) -> list[dict]:
    steps, warmup = mode.pick(4, 3, 1), mode.pick(2, 2, 1)
    order = mode.pick((1, 2, 2, 1), (1, 2), (1, 2))
    root = scratch_dir("fsdp2")
    got: dict[int, list[list[float]]] = {1: [], 2: []}
    for i, nproc in enumerate(order):
        got[nproc].append(launch(root, mode, nproc, i, steps, warmup))
    one = [x for samples in got[1] for x in samples]
    two = [x for samples in got[2] for x in samples]
    per_launch = {n: ", ".join(fmt(median(s)) for s in got[n]) for n in got}
    threads = f"2 x {mode.threads(2)} vs 1 x {mode.threads(1)} threads"
    return [row(f"2-rank FSDP2 on CPU (torchrun, gloo; {threads}) vs 1 process", median(two), median(one),
                median(two) / median(one), "report", unit="tok/s",
                note=f"launches one after the other ({'-'.join('AB'[n - 1] for n in order)}, A = 1 process), "
                     f"{steps} steps each after {warmup} of warm-up; 2 ranks {spread(two, 'tok/s')} (per launch "
                     f"{per_launch[2]}), 1 process {spread(one, 'tok/s')} (per launch {per_launch[1]})")]


if __name__ == "__main__":
    sys.exit(main_for(run, __doc__.splitlines()[0]))
