"""Where a training step's time goes: torch.profiler over the trainer's step and the plain loop's, side by side.

    python bench/profile_step.py [--steps 2] [--top 14] [--section.field value ...]

Both run in this one process, one after the other, on configs/bench.toml with the same batches and threads:

  ours    Trainer.train_step (FSDP2 at world size 1; the Trainer built as train.py builds it)
  plain   bench/plain_loop.train_step (the same GPT, no FSDP, foreach AdamW)

Prints each one's wall time per step, its total self CPU time, and the ops with the largest self CPU time in
either, with their call counts. This is the profile behind the throughput row of bench/throughput.py: it shows
which ops the difference is made of (the matmuls should cost the same in both).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import plain_loop  # noqa: E402
from bench.launch import BENCH_CONFIG  # noqa: E402
from bench.models import load, trainer_in_process  # noqa: E402


def profiled(step, steps: int) -> tuple[float, dict[str, tuple[float, int]]]:
    """(wall seconds per step, {op: (self CPU seconds, calls)}) over `steps` calls of step(), after one warm-up."""
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) / steps
    ops = {e.key: (e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()}
    return wall, ops


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(BENCH_CONFIG))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=14)
    args, overrides = parser.parse_known_args(argv)
    out = tempfile.mkdtemp(prefix="gpt-simple-bench-profile-")
    cfg = load(args.config, [*overrides, "--training.output_dir", out, "--training.tensorboard", "false",
                             "--data.prefetch", "0"])
    model, opt = plain_loop.build(cfg)
    try:
        with trainer_in_process(cfg) as trainer:
            batches = [trainer.stream.next_batch() for _ in range(args.steps + 1)]

            def ours():
                trainer.train_step(batches[trainer.train.step % len(batches)])
                trainer.train.step += 1

            def plain():
                batch = batches[0]
                plain_loop.train_step(model, opt, batch.inputs, batch.targets, cfg.optimizer.lr,
                                      cfg.optimizer.grad_clip)

            results = {"ours": profiled(ours, args.steps), "plain": profiled(plain, args.steps)}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    (ours_wall, ours_ops), (plain_wall, plain_ops) = results["ours"], results["plain"]
    total = {name: sum(s for s, _ in ops.values()) for name, (_, ops) in results.items()}
    print(f"{torch.get_num_threads()} threads, {args.steps} profiled steps each, torch {torch.__version__}")
    print(f"wall per step: ours {ours_wall:.3f} s, plain {plain_wall:.3f} s "
          f"(plain / ours {plain_wall / ours_wall:.3f})")
    print(f"self CPU time: ours {total['ours']:.3f} s, plain {total['plain']:.3f} s "
          f"(+{100 * (total['ours'] / total['plain'] - 1):.1f} %)\n")
    top = sorted(set(ours_ops) | set(plain_ops),
                 key=lambda k: -max(ours_ops.get(k, (0, 0))[0], plain_ops.get(k, (0, 0))[0]))[:args.top]
    width = max(len(k) for k in top)
    print(f"{'op':<{width}}  {'ours s':>8} {'calls':>6}  {'plain s':>8} {'calls':>6}  {'ours - plain':>12}")
    for key in top:
        (a, na), (b, nb) = ours_ops.get(key, (0.0, 0)), plain_ops.get(key, (0.0, 0))
        print(f"{key:<{width}}  {a:8.3f} {na:6d}  {b:8.3f} {nb:6d}  {a - b:+12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
