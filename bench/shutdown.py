"""Shutdown benchmark: how long a graceful stop takes, and what the per-step stop agreement costs.

  graceful stop    SIGTERM to a running `python train.py` (configs/bench.toml) at a point inside a step, until
                   the process has exited 0 with STOPPED and a committed step-N-shutdown checkpoint; against
                   one step + one synchronous save of the same run (its median step time from metrics.jsonl and
                   the shutdown save's own duration from events.jsonl). The stop has to finish the step it
                   is in, save, and exit, so it lies between 1x (signal at the end of a step) and about
                   (2 steps + save) / (step + save) (signal at the start of one).
  stop agreement   under `torchrun --nproc_per_node 2`, Trainer.agree() (the all-reduce of the stop votes
                   the loop does before every step) timed between training steps of the same 2-rank run, with
                   the ranks lined up by a barrier first; against that run's step time.

    python bench/shutdown.py [--quick | --smoke] [--json FILE]
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cli import Mode, main_for  # noqa: E402
from bench.launch import BENCH_CONFIG, PY, ROOT, TrainRun, bench_env, scratch_dir  # noqa: E402
from bench.models import load, step_tokens, trainer_in_process  # noqa: E402
from bench.stats import median, spread  # noqa: E402
from bench.table import row  # noqa: E402

CHECKS_PER_ROUND = 50


def graceful_stop(root: Path, mode: Mode, offset: float, warmup: int = 2) -> dict:
    """One launch, SIGTERM `offset` (fraction of a step) after step `warmup` is logged; the stop as seen from
    outside, and the run's own step time and shutdown-save time."""
    run = TrainRun(root / f"stop-{offset:g}", ["--training.max_steps", "1000", "--training.log_steps", "1",
                                              "--training.save_steps", "0", *mode.overrides()],
                   threads=mode.threads(), name="train.py (stop)").start()
    try:
        tokens, _ = step_tokens(mode.overrides())
        rec = run.wait_step(warmup)
        time.sleep(offset * tokens / rec["tokens_per_s"])
        sent = time.time()
        run.signal(signal.SIGTERM)
        code = run.wait_exit(timeout=300)
        exited = time.time()
    finally:
        run.kill()
    state = run.state() or {}
    saves = [e for e in run.events() if e.get("event") == "save" and e.get("type") == "shutdown"]
    ckpt = run.out / "checkpoints" / (state.get("last_checkpoint") or "missing")
    if code != 0 or state.get("status") != "STOPPED" or not saves or not (ckpt / "COMMITTED").exists():
        raise RuntimeError(f"graceful stop failed: exit {code}, status {state.get('status')}, "
                           f"checkpoint {ckpt.name} committed={(ckpt / 'COMMITTED').exists()}\n{run.log_tail()}")
    step_s = median([tokens / r["tokens_per_s"] for r in run.metrics()[1:]])
    return {"stop_s": exited - sent, "step_s": step_s, "save_s": saves[-1]["total_s"], "offset": offset}


def agreement(root: Path, mode: Mode, rounds: int, warmup: int = 2) -> dict:
    """torchrun 2 ranks of this file's --agreement-worker; rank 0's figures."""
    result = root / "agreement.json"
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(Path(__file__).resolve()),
           "--agreement-worker", str(result), "--rounds", str(rounds), "--warmup", str(warmup), *mode.overrides()]
    log = root / "agreement.log"
    with open(log, "wb") as f:
        code = subprocess.run(cmd, cwd=ROOT, env=bench_env(1), stdout=f, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=600).returncode
    if code != 0 or not result.exists():
        raise RuntimeError(f"agreement worker failed ({code}):\n" + "\n".join(log.read_text().splitlines()[-20:]))
    return json.loads(result.read_text())


def agreement_worker(result: str, rounds: int, warmup: int, overrides: list[str]) -> int:
    """Runs on every rank: a real Trainer on configs/bench.toml; per round, CHECKS_PER_ROUND stop checks (after
    a barrier, so a rank's wait for a slower one is not counted) and one training step as the loop takes it."""
    import torch.distributed as dist
    out = Path(result).parent / "agreement-run"
    cfg = load(BENCH_CONFIG, ["--training.output_dir", str(out), "--training.save_steps", "0",
                              "--training.max_steps", str(rounds + warmup + 1), *overrides])
    checks, steps = [], []
    with trainer_in_process(cfg) as trainer:
        for r in range(warmup + rounds):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(CHECKS_PER_ROUND):
                if trainer.stop_check(trainer.agree()) is not None:
                    raise RuntimeError("a stop was requested during the benchmark")
            check_s = (time.perf_counter() - start) / CHECKS_PER_ROUND
            dist.barrier()
            start = time.perf_counter()
            batch = trainer.stream.next_batch()
            trainer.record(batch, *trainer.train_step(batch))
            if r >= warmup:
                checks.append(check_s)
                steps.append(time.perf_counter() - start)
        if trainer.dist.is_main:
            Path(result).write_text(json.dumps({"check_s": checks, "step_s": steps,
                                                "world_size": trainer.dist.world_size}))
    return 0


def run(mode: Mode = Mode()) -> list[dict]:
    root = scratch_dir("shutdown")
    offsets = mode.pick([0.2, 0.8], [0.5], [0.5])  # early and late in a step
    stops = [graceful_stop(root, mode, o) for o in offsets]
    agree = agreement(root, mode, rounds=mode.pick(5, 3, 1), warmup=mode.pick(2, 2, 1))
    ratios = [s["stop_s"] / (s["step_s"] + s["save_s"]) for s in stops]
    worst = max(stops, key=lambda s: s["stop_s"] / (s["step_s"] + s["save_s"]))
    per_step = [c / s for c, s in zip(agree["check_s"], agree["step_s"])]
    return [
        row("graceful stop: SIGTERM -> exit, committed", median([s["stop_s"] for s in stops]),
            median([s["step_s"] + s["save_s"] for s in stops]), max(ratios), "≤ 1.2x", unit="s",
            note=f"signal at {', '.join(f'{o:.0%}' for o in offsets)} of a step; ratio = the worst of "
                 f"{[round(r, 3) for r in ratios]}; baseline = step {worst['step_s']:.2f}s + sync save "
                 f"{worst['save_s']:.2f}s of the same run"),
        row("stop agreement per step (2 ranks, gloo)", median(agree["check_s"]) * 1e3,
            median(agree["step_s"]) * 1e3, median(per_step), "≤ 1%", unit="ms",
            note=f"Trainer.agree() x {CHECKS_PER_ROUND} per round between steps; per-round ratio "
                 f"{spread(per_step)}"),
    ]


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--agreement-worker":
        import argparse
        p = argparse.ArgumentParser()
        p.add_argument("--agreement-worker", dest="result", required=True)
        p.add_argument("--rounds", type=int, default=5)
        p.add_argument("--warmup", type=int, default=2)
        a, overrides = p.parse_known_args(argv)
        return agreement_worker(a.result, a.rounds, a.warmup, overrides)
    return main_for(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
