"""Goodput of a chain of time-limited jobs: the tiny model trained through the local loop
(scripts/local_loop.sh, GPT_SIMPLE_MAX_RUNTIME seconds a job, no pause between jobs) against the same run in one
continuous job, in the same bench; and the run's own ledger (`gpt-simple report`) beside the measured figure.

    python bench/goodput.py [--quick | --smoke] [--json PATH]

  measured   continuous job's wall time / the chain's wall time (each from its command's start to its exit)
  ledger     the chain's calendar goodput / the continuous job's goodput, both from their ledgers (training
             that counts over wall time; the continuous job's own set-up and final save are the baseline's
             overhead too); target: within 0.02 of the measured figure
  accounted  the chain's calendar in its ledger / its wall time measured from outside: what the ledger misses
The chain's losses must equal the continuous job's (`==`): a chain that lost or repeated a step fails.

The two run side by side, one core each (on a machine with 2 or more): this machine's speed drifts by 10-25 %
from one minute to the next, which one after the other would put into the ratio; side by side both see it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cli import SMOKE_MODEL, Mode, main_for  # noqa: E402
from bench.launch import PY, ROOT, TrainRun, bench_env, read_jsonl, scratch_dir  # noqa: E402
from bench.table import row  # noqa: E402

from gpt_simple.report import PARTS, launches, summary  # noqa: E402

TINY = ROOT / "configs" / "tiny.toml"
QUIET = ["--training.tensorboard", "false", "--eval.every_steps", "0", "--eval.at_end", "false",
         "--training.log_steps", "1", "--training.save_steps", "100"]


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(out / "metrics.jsonl") if "loss" in r and "type" not in r]


def chain(out: Path, args: list[str], job_s: int, threads: int, drill: str | None) -> float:
    """The local loop until the run completes; its wall time."""
    env = {**bench_env(threads), "GPT_SIMPLE_CONFIG": str(TINY), "GPT_SIMPLE_OUTPUT_DIR": str(out),
           "GPT_SIMPLE_MAX_RUNTIME": str(job_s), "GPT_SIMPLE_RETRY_DELAY": "0", "PATH": f"{Path(PY).parent}"
           f"{os.pathsep}{os.environ.get('PATH', '')}"}
    if drill:
        env["GPT_SIMPLE_DRILL"] = drill
    start = time.time()
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "local_loop.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3600)
    seconds = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"the local loop failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    return seconds


def run(mode: Mode = Mode()) -> list[dict]:
    steps, job_s = mode.pick(600, 300, 30), mode.pick(30, 30, 10)
    drill = "step=0.2" if mode.smoke else None  # the smoke model's steps take milliseconds: make it a chain
    # the reserve: the tiny config keeps 10 s, which would stop a 10-second job before its first step
    args = [*QUIET, "--training.max_steps", str(steps), "--training.walltime_reserve_seconds", "2",
            *(SMOKE_MODEL if mode.smoke else []), *mode.data()]
    root = scratch_dir("goodput")
    side_by_side = (os.cpu_count() or 1) >= 2
    threads = mode.threads(2 if side_by_side else 1)

    continuous = TrainRun(root / "continuous", args, config=TINY, threads=threads, name="train.py (continuous)",
                          env={"GPT_SIMPLE_DRILL": drill} if drill else None)
    ended: list[float] = []

    def stamp_exit() -> None:
        continuous.proc.wait()
        ended.append(time.time())

    start = time.time()
    continuous.start()
    waiter = threading.Thread(target=stamp_exit)
    waiter.start()
    if not side_by_side:
        waiter.join()
    chain_s = chain(root / "chain", args, job_s, threads, drill)
    waiter.join()
    continuous.finish()
    continuous_s = ended[0] - start
    if losses(root / "chain") != losses(root / "continuous"):
        raise RuntimeError("the chain's losses differ from the continuous job's")

    rows_chain, rows_one = launches(root / "chain"), launches(root / "continuous")
    s_chain, s_one = summary(rows_chain), summary(rows_one)
    measured = continuous_s / chain_s
    predicted = s_chain["calendar_goodput"] / s_one["goodput"]
    accounted = s_chain["calendar_s"] / chain_s
    step_ratio = (s_one["totals"]["train_s"] / s_chain["totals"]["train_s"]) if s_chain["totals"]["train_s"] else 0
    t = s_chain["totals"]
    where = ", ".join(f"{k[:-2]} {t[k]:.1f}s" for k in PARTS) + f", lost {t['lost_s']:.1f}s, between jobs " \
                                                                  f"{s_chain['queue_s']:.1f}s"
    return [
        row(f"goodput of a chain of {job_s}-second jobs ({len(rows_chain)} launches, {steps} steps): continuous "
            f"job's time / the chain's", continuous_s, chain_s, measured, "≥ 0.95", unit="s",
            note=f"losses == the continuous job's; the chain's time went to: {where}"),
        row("goodput: the ledger's figure against the measured one", predicted, measured,
            abs(predicted - measured), "≤ 0.02",
            note=f"ledger: the chain's calendar goodput {s_chain['calendar_goodput']:.3f} / the continuous job's "
                 f"goodput {s_one['goodput']:.3f}; ratio column = the absolute difference; the continuous job's "
                 f"steps took {step_ratio:.3f}x the chain's ({'side by side' if side_by_side else 'one after the other'})"),
        row("goodput: the chain's wall time its ledger accounts for (calendar / measured)", s_chain["calendar_s"],
            chain_s, accounted, "≥ 0.98", unit="s",
            note="the rest: the local loop's own start and end, outside every launch"),
    ]


if __name__ == "__main__":
    sys.exit(main_for(run, __doc__.splitlines()[0]))
