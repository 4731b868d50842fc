"""The benchmark suite: every benchmark, one table (our figure, a baseline measured in the same run, ratio,
target).

    python bench/run.py                  # everything: about 6 minutes on 2 quiet cores, 20 on busy ones
    python bench/run.py --quick          # fewer repetitions
    python bench/run.py --smoke          # every benchmark once on a small model: does it work? (the tests run it)
    python bench/run.py --only shutdown,resume --json bench.json

Benchmarks (each also runs alone as `python bench/NAME.py`):
  throughput  the trainer vs the plain loop (bench/plain_loop.py) in one process, step by step in turns; CPU MFU
              against a matmul ceiling measured between the steps; data-stream wait
  fsdp2       the trainer on 2 ranks (torchrun) vs 1 process, taking turns step by step (bench/gate.py)
  hsdp        4 ranks: HSDP (2x2 mesh) vs plain FSDP (1x4), taking turns; bytes sent per rank per step (measured)
  checkpoint  async save blocking vs a synchronous save, GPT-2 124M + AdamW; step time after a save
  shutdown    SIGTERM -> committed checkpoint and exit; the per-step stop agreement
  resume      launch -> first step, resumed vs fresh + load
  goodput     a chain of time-limited jobs through the local loop vs one continuous job; the ledger's figure
  startup     a resumed launch's set-up, phase by phase (the clock's marks), in steps' worth; tiny and GPT-2 124M
  eval        an evaluation's tokens/s vs a training step's forward pass on the same batches; its share of the demo run
  gpu         GPT-2 124M and 350M on one GPU (a skipped row without CUDA)

Exit code: 0 when every benchmark ran (a missed target is reported in the table, not an error: the figures
move with the machine's load), 1 when a benchmark failed.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cli import add_mode_args, exit_cleanly_on_termination, machine, mode_from, start  # noqa: E402
from bench.table import format_table, row, write_json  # noqa: E402

BENCHMARKS = ("throughput", "fsdp2", "hsdp", "checkpoint", "shutdown", "resume", "startup", "goodput", "eval", "gpu")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_mode_args(p)
    p.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    a = p.parse_args(argv)
    mode = start(mode_from(a))
    exit_cleanly_on_termination()
    names = a.only.split(",") if a.only else list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    info = machine()
    print(f"gpt-simple benchmarks ({mode.level}) on {info['host']}: {info['cpu']} ({info['cpus']} CPUs), "
          f"torch {info['torch']}; load average {info['loadavg_at_start'][0]:.1f}", flush=True)
    rows, failed, started = [], [], time.time()
    for name in names:
        t0 = time.time()
        print(f"[{name}] running ...", flush=True)
        try:
            got = importlib.import_module(f"bench.{name}").run(mode)
        except Exception as e:  # noqa: BLE001 - one broken benchmark must not hide the others' figures
            traceback.print_exc()
            failed.append(name)
            got = [row(f"{name}: FAILED", None, None, None, "report", note=f"{type(e).__name__}: {e}"[:300])]
        for r in got:
            r["benchmark"] = name
        rows += got
        print(f"[{name}] {time.time() - t0:.0f}s; load average {os.getloadavg()[0]:.1f}", flush=True)
    print()
    print(format_table(rows))
    elapsed = time.time() - started
    print(f"\n({elapsed:.0f}s in all; load average at start {info['loadavg_at_start'][0]:.1f}, "
          f"now {os.getloadavg()[0]:.1f})")
    if a.json:
        write_json(a.json, rows, machine=info, seconds=elapsed, mode=mode.level, loadavg_at_end=os.getloadavg())
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
