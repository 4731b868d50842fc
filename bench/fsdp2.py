"""2-rank FSDP2 on one CPU against one process: the trainer under `torchrun --nproc_per_node 2` (gloo, 1 thread
per rank) against one process (2 threads), on configs/bench.toml, same global batch.

    python bench/fsdp2.py [--quick | --smoke] [--json PATH]

Both runs are started once and take turns, one optimizer step at a time, each held at its step boundary while
the other steps (bench/gate.py: Trainer.run_loop as train.py runs it, with a gate in front of each step), so
that both see the same machine; the order alternates from round to round. A step's figure is the run's own
tokens_per_s for it (metrics.jsonl, log_steps = 1). The ratio is the median over rounds of 2-rank tokens/s over
1-process tokens/s: what data parallelism costs when the "network" (gloo over loopback) and the compute share
the same cores. It says nothing about multi-GPU scaling.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cli import Mode, main_for  # noqa: E402
from bench.gate import GatedRun  # noqa: E402
from bench.launch import scratch_dir  # noqa: E402
from bench.stats import median, spread  # noqa: E402
from bench.table import row  # noqa: E402


def run(mode: Mode = Mode()) -> list[dict]:
    rounds, warmup = mode.pick(6, 3, 1), mode.pick(2, 2, 1)
    root = scratch_dir("fsdp2")
    one = GatedRun(root / "one", mode.overrides(), 1, mode.threads(1), "trainer x1").start()
    two = GatedRun(root / "two", mode.overrides(), 2, mode.threads(2), "torchrun x2").start()
    got: dict[str, list[float]] = {"one": [], "two": []}
    try:
        for _ in range(warmup):
            one.advance()
            two.advance()
        for r in range(rounds):
            for name, g in ((("one", one), ("two", two)) if r % 2 == 0 else (("two", two), ("one", one))):
                got[name].append(g.advance()["tokens_per_s"])
    finally:
        one.stop()
        two.stop()
    paired = [t / o for t, o in zip(got["two"], got["one"])]
    threads = f"2 x {mode.threads(2)} vs 1 x {mode.threads(1)} threads"
    return [row(f"2-rank FSDP2 on CPU (torchrun, gloo; {threads}) vs 1 process", median(got["two"]),
                median(got["one"]), median(paired), "report", unit="tok/s",
                note=f"taking turns step by step, {rounds} rounds after {warmup} of warm-up; per-round ratio "
                     f"{spread(paired)}; 2 ranks {spread(got['two'], 'tok/s')}, 1 process "
                     f"{spread(got['one'], 'tok/s')}")]


if __name__ == "__main__":
    sys.exit(main_for(run, __doc__.splitlines()[0]))
