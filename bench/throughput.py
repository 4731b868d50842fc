"""Training throughput of the trainer against a plain PyTorch loop, and CPU model-FLOP utilisation, measured
in one process, step by step in turns.

    python bench/throughput.py [--quick | --smoke] [--json PATH]

Two sizes: configs/bench.toml (~14M parameters, steps of about two seconds: the MFU rows) and nanoGPT's CPU
recipe (4 layers, width 128, context 64, batch 12, one thread: steps of milliseconds, where every per-step cost
of the trainer shows).

Three participants take turns in this one process, with the same OpenMP threads, so that every round sees the
same machine (a shared one: its speed moves by up to 10x from one minute to the next):

  ours    gpt_simple.trainer.Trainer on configs/bench.toml, built as `train.py` builds it, running its own
          run_loop unchanged: stop agreement, data stream (prefetch thread), train_step, metrics line, heartbeat.
          A gate at the step boundary (it wraps Trainer.agree, the first thing of every step) times each
          step from boundary to boundary and hands the process to the others in between.
  plain   bench/plain_loop.PlainLoop.step: the same GPT, batch and data, no FSDP, no framework
  matmul  fp32 torch.mm products (512^3, 1024^3, 2048^3 and the model's MLP product), the fastest of 3 each:
          the CPU's achievable FLOP/s, the MFU ceiling (bench/ceiling.py says why not one large product)

A round is one step of each, in an order that rotates from round to round; the first steps are warm-up. The
throughput ratio is the median over rounds of plain step time / our step time, with its spread.

The MFU is the median over rounds of the model's FLOP rate in a round over that round's ceiling sample (same
process, threads, moment). A model rate above its round's sample means that sample caught a busy moment: that
round is measured against the fastest sample of the whole run instead (the note counts such rounds), and a
rate above even that is capped at 1 and said so. The note also gives the MFU against the fastest sample
throughout, a lower bound on a busy machine.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import ceiling  # noqa: E402
from bench.cli import Mode, main_for  # noqa: E402
from bench.gate import StepGate  # noqa: E402
from bench.launch import read_jsonl, scratch_dir  # noqa: E402
from bench.models import load, step_tokens, trainer_in_process  # noqa: E402
from bench.plain_loop import PlainLoop  # noqa: E402
from bench.stats import median, spread  # noqa: E402
from bench.table import row  # noqa: E402

# nanoGPT's CPU recipe (its README: shakespeare_char on a CPU): 4 layers, width 128, 4 heads, context 64, batch 12
# in one micro-batch, one thread: 768 tokens a step, where the trainer's own per-step costs weigh most.
SMALL_STEPS = ["--model.n_layer", "4", "--model.n_embd", "128", "--model.n_head", "4", "--model.block_size", "64",
               "--data.seq_len", "64", "--training.global_batch_size", "12", "--training.micro_batch_size", "12"]


def measure(mode: Mode, overrides: list[str] | None = None, rounds: int | None = None, warmup: int | None = None,
            threads: int | None = None, with_ceiling: bool = True, name: str = "throughput") -> dict:
    """Our steps and the plain loop's (and a matmul ceiling sample unless with_ceiling is False), in turns."""
    import torch
    rounds = rounds or mode.pick(8, 4, 2)
    warmup = warmup or mode.pick(3, 2, 1)
    squares = mode.pick(ceiling.SQUARES, ceiling.SQUARES, (128, 256))
    overrides = mode.overrides() if overrides is None else overrides
    tokens, fpt = step_tokens(overrides)
    out = scratch_dir(name) / "run"
    cfg = load(overrides=["--training.output_dir", str(out), "--training.max_steps", str(warmup + rounds + 2),
                          "--training.log_steps", "1", "--training.save_steps", "0", *overrides])
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads or threads_before)
    plain = PlainLoop(cfg)
    plain_s, mm, best_shape = [], [], []

    def between(k: int) -> None:
        if k < warmup:  # our warm-up step comes next: warm the others up too
            plain.step()
            return
        r = k - warmup
        for part in (("plain", "matmul") if r % 2 == 0 else ("matmul", "plain")):
            if part == "plain":
                plain_s.append(plain.step()["seconds"])
            elif with_ceiling:
                rate, shape = ceiling.sample(cfg, squares)
                mm.append(rate)
                best_shape.append(shape)

    try:
        with trainer_in_process(cfg) as trainer:
            gate = StepGate(trainer, between, warmup + rounds)
            outcome = trainer.run_loop()
            if not gate.done:
                raise RuntimeError(f"the trainer stopped early: {outcome.reason}")
        threads_used = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads_before)
    ours_s = gate.samples[warmup:]
    records = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("step", 0) > warmup]
    return {"tokens": tokens, "fpt": fpt, "ours_s": ours_s, "plain_s": plain_s, "matmul": mm,
            "records": records, "threads": threads_used,
            "best_shape": best_shape, "squares": squares}


def small_steps_row(mode: Mode) -> dict:
    """The trainer against the plain loop where a step is small (nanoGPT's CPU recipe, one thread)."""
    res = measure(mode, [*mode.data(), *SMALL_STEPS], rounds=mode.pick(60, 30, 2), warmup=mode.pick(10, 5, 1),
                  threads=1, with_ceiling=False, name="throughput-small")
    ours_s, plain_s, tok = res["ours_s"], res["plain_s"], res["tokens"]
    paired = [p / o for p, o in zip(plain_s, ours_s)]
    return row("small steps, 1 process (nanoGPT's CPU recipe: 4 x 128, context 64, batch 12, 1 thread): trainer "
               "vs plain loop", median([tok / s for s in ours_s]), median([tok / s for s in plain_s]),
               median(paired), "≥ 0.97", unit="tok/s",
               note=f"per-round plain step / our step, median of {len(paired)} rounds, spread {spread(paired)}; "
                    f"our step {spread([s * 1e3 for s in ours_s], 'ms')}, plain step "
                    f"{spread([s * 1e3 for s in plain_s], 'ms')}")


def utilisation(rates: list[float], ceilings: list[float]) -> tuple[list[float], int, int]:
    """Per round: rate / that round's ceiling sample, or / the fastest sample of the run where the rate exceeds
    its own round's; capped at 1. Returns (ratios, rounds that fell back to the fastest, rounds capped)."""
    top, ratios, fell_back, capped = max(ceilings), [], 0, 0
    for rate, ceiling in zip(rates, ceilings):
        if rate > ceiling:
            fell_back += 1
            ceiling = top
        if rate > ceiling:
            capped += 1
        ratios.append(min(1.0, rate / ceiling))
    return ratios, fell_back, capped


def rows_from(res: dict) -> list[dict]:
    tok, fpt, ours_s, plain_s, mm = res["tokens"], res["fpt"], res["ours_s"], res["plain_s"], res["matmul"]
    ours_tps, plain_tps = [tok / s for s in ours_s], [tok / s for s in plain_s]
    paired = [p / o for p, o in zip(plain_s, ours_s)]
    ours_mfu, ours_back, ours_capped = utilisation([t * fpt for t in ours_tps], mm)
    plain_mfu, plain_back, plain_capped = utilisation([t * fpt for t in plain_tps], mm)
    top = max(mm)
    shape = res["best_shape"][mm.index(top)]
    squares = ", ".join(f"{n}^3" for n in res["squares"])
    ceiling_note = (f"ceiling = a fp32 matmul sample taken in the same round, {res['threads']} thread(s) as the "
                    f"model, the fastest of {squares} and the model's MLP product "
                    f"({spread([m / 1e9 for m in mm], 'GFLOP/s')}; fastest {shape}); "
                    f"{ours_back} of {len(mm)} rounds ran faster than their own sample and were measured against "
                    f"the run's fastest ({top / 1e9:.1f} GFLOP/s)")
    if ours_capped or plain_capped:
        ceiling_note += (f"; {ours_capped + plain_capped} model round(s) ran faster than even that: the ceiling is "
                         f"under-measured, their utilisation capped at 1")
    out = [
        row("training throughput, 1 process (trainer vs plain loop, same process, alternating)",
            median(ours_tps), median(plain_tps), median(paired), "≥ 0.95", unit="tok/s",
            note=f"per-round plain step / our step, median of {len(paired)} rounds, spread {spread(paired)}; "
                 f"ratio of the medians {median(plain_s) / median(ours_s):.3f}; our step "
                 f"{spread(ours_s, 's')}, plain step {spread(plain_s, 's')}"),
        row("CPU model-FLOP utilisation (trainer)", median(ours_tps) * fpt / 1e9, median(mm) / 1e9,
            median(ours_mfu), "≥ 0.70", unit="GFLOP/s",
            note=f"{fpt / 1e6:.1f} MFLOP/token (6N + attention) x tok/s over the ceiling, median over rounds "
                 f"({spread(ours_mfu)}); {ceiling_note}; against the run's fastest sample throughout "
                 f"{min(1.0, median(ours_tps) * fpt / top):.3f} (a lower bound)"),
        row("CPU model-FLOP utilisation (plain loop, for reference)", median(plain_tps) * fpt / 1e9,
            median(mm) / 1e9, median(plain_mfu), "report", unit="GFLOP/s",
            note=f"{spread(plain_mfu)}; {plain_back} round(s) against the run's fastest sample"),
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
    return [*rows_from(measure(mode)), small_steps_row(mode)]


if __name__ == "__main__":
    sys.exit(main_for(run, __doc__.splitlines()[0]))
