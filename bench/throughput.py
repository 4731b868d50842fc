"""Training throughput of the trainer against a plain PyTorch loop, and CPU model-FLOP utilisation, measured
in one process, step by step in turns.

    python bench/throughput.py [--quick | --smoke] [--json PATH]

Three participants take turns in this one process, with the same OpenMP threads, so that every round sees the
same machine (a shared one: its speed moves by up to 10x from one minute to the next):

  ours    gpt_simple.trainer.Trainer on configs/bench.toml, built as `train.py` builds it, running its own
          run_loop unchanged: stop agreement, data stream (prefetch thread), train_step, metrics line, heartbeat.
          A gate at the step boundary (it wraps Trainer.stop_check, the first thing of every step) times each
          step from boundary to boundary and hands the process to the others in between.
  plain   bench/plain_loop.PlainLoop.step: the same GPT, batch and data, no FSDP, no framework
  matmul  fp32 torch.mm products (512^3, 1024^3, 2048^3 and the model's MLP product), the fastest of 3 each:
          the CPU's achievable FLOP/s, the MFU ceiling (bench/ceiling.py says why not one large product)

A round is one step of each, in an order that rotates from round to round; the first steps are warm-up. The
throughput ratio is the median over rounds of plain step time / our step time, with its spread. The MFU ceiling
is the fastest of all the rounds' matmuls: a ceiling measured on a busy moment would be too low, and a model
rate above the ceiling would mean the ceiling is wrong; the row says so if that happens and never prints a
utilisation above 1.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import ceiling  # noqa: E402
from bench.cli import Mode, main_for  # noqa: E402
from bench.launch import read_jsonl, scratch_dir  # noqa: E402
from bench.models import load, step_tokens, trainer_in_process  # noqa: E402
from bench.plain_loop import PlainLoop  # noqa: E402
from bench.stats import fmt, median, spread  # noqa: E402
from bench.table import row  # noqa: E402

DONE = "benchmark done"


class StepGate:
    """Stands in for trainer.stop_check. At each step boundary: record the time of the step just finished, run
    `between(k)` (k = our steps done so far), restart the trainer's metrics window (so that its logged figures
    cover its own step only), then run the real stop check. Returns DONE after `steps` steps."""

    def __init__(self, trainer, between, steps: int):
        self.trainer, self.between, self.steps = trainer, between, steps
        self.check = trainer.stop_check
        trainer.stop_check = self
        self.samples: list[float] = []
        self.mark: float | None = None

    def __call__(self) -> str | None:
        now = time.perf_counter()
        if self.mark is not None:
            self.samples.append(now - self.mark)
        if len(self.samples) >= self.steps:
            return DONE
        self.between(len(self.samples))
        self.trainer.meter.reset_window()
        self.mark = time.perf_counter()
        return self.check()


def measure(mode: Mode) -> dict:
    rounds, warmup = mode.pick(8, 4, 2), mode.pick(3, 2, 1)
    squares = mode.pick(ceiling.SQUARES, ceiling.SQUARES, (128, 256))
    overrides = mode.overrides()
    tokens, fpt = step_tokens(overrides)
    out = scratch_dir("throughput") / "run"
    cfg = load(overrides=["--training.output_dir", str(out), "--training.max_steps", str(warmup + rounds + 2),
                          "--training.log_steps", "1", "--training.save_steps", "0", *overrides])
    plain = PlainLoop(cfg)
    plain_s, mm, best_shape = [], [], []

    def between(k: int) -> None:
        if k < warmup:  # our warm-up step comes next: warm the others up too
            plain.step()
            return
        r = k - warmup
        for name in (("plain", "matmul") if r % 2 == 0 else ("matmul", "plain")):
            if name == "plain":
                plain_s.append(plain.step()["seconds"])
            else:
                rate, shape = ceiling.sample(cfg, squares)
                mm.append(rate)
                best_shape.append(shape)

    import torch
    with trainer_in_process(cfg) as trainer:
        gate = StepGate(trainer, between, warmup + rounds)
        outcome = trainer.run_loop()
        if outcome != DONE:
            raise RuntimeError(f"the trainer stopped early: {outcome}")
    ours_s = gate.samples[warmup:]
    records = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("step", 0) > warmup]
    return {"tokens": tokens, "fpt": fpt, "ours_s": ours_s, "plain_s": plain_s, "matmul": mm,
            "records": records, "threads": torch.get_num_threads(),
            "best_shape": best_shape}


def rows_from(res: dict) -> list[dict]:
    tok, fpt, ours_s, plain_s = res["tokens"], res["fpt"], res["ours_s"], res["plain_s"]
    ours_tps, plain_tps = [tok / s for s in ours_s], [tok / s for s in plain_s]
    paired = [p / o for p, o in zip(plain_s, ours_s)]
    top = max(res["matmul"])
    ours_rate, plain_rate = median(ours_tps) * fpt, median(plain_tps) * fpt
    fastest = max(max(ours_tps), max(plain_tps)) * fpt
    shape = res["best_shape"][res["matmul"].index(top)]
    ceiling_note = (f"ceiling = the fastest of {len(res['matmul'])} interleaved fp32 matmul samples "
                    f"({spread([m / 1e9 for m in res['matmul']], 'GFLOP/s')}; fastest product {shape}), "
                    f"{res['threads']} thread(s), as the model")
    if fastest > top:
        ceiling_note += (f"; a model round ran at {fastest / 1e9:.1f} GFLOP/s, above it: the ceiling is "
                         f"under-measured, utilisation capped at 1")
    out = [
        row("training throughput, 1 process (trainer vs plain loop, same process, alternating)",
            median(ours_tps), median(plain_tps), median(paired), "≥ 0.95", unit="tok/s",
            note=f"per-round plain step / our step, median of {len(paired)} rounds, spread {spread(paired)}; "
                 f"ratio of the medians {median(plain_s) / median(ours_s):.3f}; our step "
                 f"{spread(ours_s, 's')}, plain step {spread(plain_s, 's')}"),
        row("CPU model-FLOP utilisation (trainer)", ours_rate / 1e9, top / 1e9, min(1.0, ours_rate / top),
            "≥ 0.70", unit="GFLOP/s",
            note=f"{fpt / 1e6:.1f} MFLOP/token (6N + attention) x median tok/s over the ceiling; {ceiling_note}; "
                 f"model rate per round {spread([t * fpt / 1e9 for t in ours_tps], 'GFLOP/s')}"),
        row("CPU model-FLOP utilisation (plain loop, for reference)", plain_rate / 1e9, top / 1e9,
            min(1.0, plain_rate / top), "report", unit="GFLOP/s"),
    ]
    # the trainer's own figures for its steps (its window restarts at the gate): the time it waited for data
    recs = [r for r in res["records"] if r.get("data_wait_frac") is not None and r.get("tokens_per_s")]
    wait = [r["data_wait_frac"] * tok / r["tokens_per_s"] for r in recs]
    step = [tok / r["tokens_per_s"] for r in recs]
    out.append(row("data stream: wait for the batch / step time", median(wait) * 1e3, median(step) * 1e3,
                   median([w / s for w, s in zip(wait, step)]), "≤ 1%", unit="ms",
                   note=f"the trainer's own data_wait_frac over its logged step windows ({len(recs)}), prefetch "
                        f"thread 2 batches ahead; wait {spread([w * 1e3 for w in wait], 'ms')}"))
    return out


def run(mode: Mode = Mode()) -> list[dict]:
    return rows_from(measure(mode))


if __name__ == "__main__":
    sys.exit(main_for(run, __doc__.splitlines()[0]))
