"""Training throughput of the real train.py against a plain PyTorch loop, CPU MFU, and 2-rank FSDP2 on gloo.

    python bench/throughput.py [--quick] [--json PATH]

Four participants run in lockstep, one optimizer step each per round, while the others are frozen, so that
every figure of a round sees the same machine (this one is shared, and its speed swings by up to 10x):

  ours      python train.py --config configs/bench.toml            (1 process, both cores: OMP_NUM_THREADS=2)
  plain     python bench/plain_loop.py --gate                      (same model code, batch, data; no framework)
  fsdp2     torchrun --nproc_per_node 2 train.py ...               (2 ranks x 1 thread, gloo)
  matmul    a 2048^3 fp32 torch.mm in this process, same threads   (the CPU's achievable FLOP/s)

train.py's figure is its own per-step tokens_per_s from output_dir/metrics.jsonl (log_steps = 1), minus the
time the harness held it frozen inside the step (see common.FrozenTrain); the first steps are warm-up.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (FrozenTrain, GatedPlain, TrainRun, main_for, median, row,  # noqa: E402
                          scratch_dir, spread, step_tokens)
from gpt_simple.metrics import measure_matmul_flops  # noqa: E402


def warm_up(runs: list[FrozenTrain], steps: int, timeout: float = 900) -> None:
    """Let the train.py runs start together; freeze each as soon as it has logged `steps` steps."""
    deadline = time.time() + timeout
    while not all([r.ready(steps) for r in runs]):
        if time.time() > deadline:
            raise TimeoutError(f"warm-up of {steps} steps took over {timeout}s")
        time.sleep(0.005)


def measure(quick: bool = False, rounds: int | None = None, warmup: int | None = None, fsdp2: bool = True,
            overrides: list[str] = ()) -> dict:
    rounds = rounds or (4 if quick else 8)
    warmup = warmup or (2 if quick else 3)
    tokens, fpt = step_tokens(overrides)
    root = scratch_dir("throughput")
    max_steps = ["--training.max_steps", str(warmup + rounds + 5), "--training.log_steps", "1",
                 "--training.save_steps", "0", *overrides]
    ours = TrainRun(root / "ours", max_steps, nproc=1, name="train.py").start()
    two = TrainRun(root / "fsdp2", max_steps, nproc=2, name="torchrun x2").start() if fsdp2 else None
    plain = GatedPlain(overrides)
    parts = {}
    try:
        plain.ready()
        parts["ours"] = FrozenTrain(ours, tokens)
        if two is not None:
            parts["fsdp2"] = FrozenTrain(two, tokens)
        warm_up([p for p in parts.values()], warmup)
        plain.warm_up(warmup)
        parts["plain"] = plain
        mm: list[float] = []
        order = list(parts) + ["matmul"]
        per_round = []
        for r in range(rounds):
            rotated = order[r % len(order):] + order[:r % len(order)]
            got = {}
            for name in rotated:
                if name == "matmul":
                    got[name] = measure_matmul_flops()  # the ceiling train.py's MFU uses
                    mm.append(got[name])
                else:
                    got[name] = parts[name].advance()
            per_round.append(got)
    finally:
        for p in parts.values():
            if isinstance(p, FrozenTrain):
                p.release()
        ours.kill()
        if two is not None:
            two.kill()
        plain.close()
    return {"tokens_per_step": tokens, "flops_per_token": fpt, "rounds": per_round, "matmul": mm,
            "ours_records": parts["ours"].records,
            "fsdp2_records": parts["fsdp2"].records if "fsdp2" in parts else [], "dir": str(root)}


def rows_from(res: dict) -> list[dict]:
    tok, fpt, rounds = res["tokens_per_step"], res["flops_per_token"], res["rounds"]
    ours_tps = [tok / r["ours"] for r in rounds]
    plain_tps = [tok / r["plain"] for r in rounds]
    paired = [r["plain"] / r["ours"] for r in rounds]
    mfu = [tok / r["ours"] * fpt / r["matmul"] for r in rounds]
    plain_mfu = [tok / r["plain"] * fpt / r["matmul"] for r in rounds]
    reported_mfu = [rec.get("mfu") for rec in res["ours_records"] if rec.get("mfu") is not None]
    out = [
        row("training throughput, 1 process", median(ours_tps), median(plain_tps), median(paired), "≥ 0.95",
            unit="tok/s",
            note=f"train.py vs bench/plain_loop.py, {len(rounds)} lockstep rounds; ratio = median of per-round "
                 f"ratios ({spread(paired)}); train.py {spread(ours_tps)} tok/s"),
        row("CPU model-FLOP utilisation", median(ours_tps) * fpt / 1e9, median(res["matmul"]) / 1e9, median(mfu),
            "≥ 0.70", unit="GFLOP/s",
            note=f"{fpt / 1e6:.1f} MFLOP/token (model.flops_per_token) x train.py tok/s, over a 2048^3 fp32 "
                 f"torch.mm with the same 2 threads measured in each round; plain loop reaches "
                 f"{median(plain_mfu):.3f}; train.py's own logged mfu "
                 f"{median(reported_mfu):.3f} (its ceiling is measured once at start-up, while the other "
                 f"benchmark processes start)"),
        row("CPU MFU of the plain loop (floor reference)", median(plain_tps) * fpt / 1e9,
            median(res["matmul"]) / 1e9, median(plain_mfu), "report", unit="GFLOP/s"),
    ]
    # train.py's data_wait_frac is over its whole window, frozen time included: back to seconds, then over the
    # corrected step time.
    recs = [r for r in res["ours_records"] if r.get("data_wait_frac") is not None and r["seconds"] == r["seconds"]]
    wait = [r["data_wait_frac"] * tok / r["tokens_per_s"] for r in recs]
    out.append(row("data stream: wait for the batch / step time", median(wait) * 1e3,
                   median([r["seconds"] for r in recs]) * 1e3,
                   median([w / r["seconds"] for w, r in zip(wait, recs)]), "≤ 1%", unit="ms",
                   note="train.py's own data_wait_frac (time in stream.next_batch, prefetch depth 2)"))
    if rounds and "fsdp2" in rounds[0]:
        two_tps = [tok / r["fsdp2"] for r in rounds]
        two_paired = [r["ours"] / r["fsdp2"] for r in rounds]
        out.append(row("2-rank FSDP2 on CPU (torchrun, gloo)", median(two_tps), median(ours_tps), median(two_paired),
                       "report", unit="tok/s",
                       note=f"2 ranks x 1 thread vs 1 process x 2 threads, same global batch; "
                            f"{spread(two_paired)}; see docs/performance.md for the gap"))
    return out


def run(quick: bool = False) -> list[dict]:
    return rows_from(measure(quick))


if __name__ == "__main__":
    sys.exit(main_for(run, __doc__.splitlines()[0]))
