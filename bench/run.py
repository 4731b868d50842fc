"""The benchmark suite: every benchmark, one table (our figure, a baseline measured in the same run, ratio,
target).

    python bench/run.py                  # everything, a few minutes on 2 cores
    python bench/run.py --quick          # fewer repetitions
    python bench/run.py --only shutdown,resume --json bench.json

Benchmarks (each also runs alone as `python bench/NAME.py`):
  throughput  train.py vs the plain loop (bench/plain_loop.py), CPU MFU, 2-rank FSDP2, data-stream wait
  checkpoint  async save blocking vs a synchronous save, GPT-2 124M + AdamW
  shutdown    SIGTERM -> committed checkpoint and exit; the per-step stop agreement
  resume      launch -> first step, resumed vs fresh + load
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

from bench.common import (check_target, exit_cleanly_on_termination, format_table, machine, row,  # noqa: E402
                          write_json)

BENCHMARKS = ("throughput", "checkpoint", "shutdown", "resume", "gpu")


def normalise(r: dict) -> dict:
    """bench/checkpoint.py keeps its own row format: numeric or None targets, no units."""
    target = r.get("target")
    if target is None:
        target = "report"
    elif isinstance(target, (int, float)):
        target = f"≤ {target:g}"
    return {**r, "target": target, "ok": r.get("ok", check_target(r.get("ratio"), target))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions (about half the time)")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument("--json", help="also write the rows and the machine description to this file")
    a = p.parse_args(argv)
    exit_cleanly_on_termination()
    names = a.only.split(",") if a.only else list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    info = machine()
    print(f"gpt-simple benchmarks on {info['host']}: {info['cpu']} ({info['cpus']} CPUs), torch {info['torch']}; "
          f"load average {info['loadavg_at_start'][0]:.1f}", flush=True)
    rows, failed, started = [], [], time.time()
    for name in names:
        t0 = time.time()
        print(f"[{name}] running ...", flush=True)
        try:
            got = [normalise(r) for r in importlib.import_module(f"bench.{name}").run(quick=a.quick)]
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
        write_json(a.json, rows, machine=info, seconds=elapsed, quick=a.quick, loadavg_at_end=os.getloadavg())
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
