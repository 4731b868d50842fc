"""Evaluation benchmark: what an evaluation costs, against the forward passes it cannot avoid, and in a run.

  * rate: eval.py's Evaluator.evaluate (the trainer's model: FSDP2 over a one-rank group, the demo corpus's
    validation sequences, the run's micro-batches) against the forward pass of a training step over the very
    same batches on the same model (model(inputs, targets) under no_grad: the mean loss, no per-token sums,
    no reduction over ranks, no RNG or sharding bookkeeping), the two taking turns round by round; tokens/s,
    medians. Target (issue 11): >= 0.9 of the forward-only rate.
  * share: the default demo run (configs/tiny.toml: 300 steps, an evaluation every 100 and at the end) trained
    by train.py in a subprocess; the seconds its console reports for evaluations against the process's wall
    time. Reported (no target).

    python bench/eval.py            # 7 rounds; the whole default run
    python bench/eval.py --quick    # 3 rounds; 100 steps
    python bench/eval.py --smoke    # a check that it works (tiny figures, 10 steps)
"""
from __future__ import annotations

import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cli import Mode, main_for  # noqa: E402
from bench.table import row  # noqa: E402

EVAL_LINE = re.compile(r"^eval step \d+ .* tokens in ([0-9.]+)s$")


def _evaluator(mode: Mode):
    import torch

    from gpt_simple.config import load_config
    from gpt_simple.data import demo_buckets
    from gpt_simple.data.prepare import ensure_demo
    from gpt_simple.eval import Evaluator, validation_buckets
    from gpt_simple.model import GPT
    from gpt_simple.parallel import init_distributed, parallelize
    cfg = load_config(ROOT / "configs" / "tiny.toml", mode.data())
    if cfg.data.demo:
        ensure_demo(cfg.data.dir, demo_buckets(cfg))
    if mode.smoke:
        cfg.eval.tokens = 2048
    d = init_distributed("cpu")
    torch.manual_seed(0)
    model = parallelize(GPT(cfg.model), cfg.training, d.device)
    names = [p.name for p in sorted(Path(cfg.data.dir).iterdir()) if p.is_dir() and not p.name.startswith(".")]
    return Evaluator(cfg, model, d.device, 0, 1, validation_buckets(cfg, names)), model, cfg


def _forward_only(model, sequences: dict, micro_batch: int) -> float:
    """Seconds for a training step's forward pass (inputs and targets in, the mean loss out) over the
    evaluator's batches, without autograd."""
    import torch
    start = time.perf_counter()
    model.eval()
    with torch.no_grad():
        for seqs in sequences.values():
            for first in range(0, len(seqs), micro_batch):
                batch = torch.from_numpy(seqs[first:first + micro_batch])
                model(batch[:, :-1], batch[:, 1:])
    model.train()
    return time.perf_counter() - start


def rate_rows(mode: Mode) -> list[dict]:
    evaluator, model, cfg = _evaluator(mode)
    tokens = sum(evaluator.tokens().values())
    evals, forwards = [], []
    evaluator.evaluate(0)                                   # warm-up, both
    _forward_only(model, evaluator.sequences, cfg.training.micro_batch_size)
    for _ in range(mode.pick(7, 3, 1)):
        start = time.perf_counter()
        evaluator.evaluate(0)
        evals.append(time.perf_counter() - start)
        forwards.append(_forward_only(model, evaluator.sequences, cfg.training.micro_batch_size))
    ours, base = tokens / statistics.median(evals), tokens / statistics.median(forwards)
    return [row("evaluation tokens/s vs forward-only on the same batches", ours, base, ours / base, "≥ 0.9",
                unit="tok/s", note=f"tiny model, {tokens:,} validation tokens, micro-batch "
                                   f"{cfg.training.micro_batch_size}")]


def share_rows(mode: Mode) -> list[dict]:
    steps = mode.pick(300, 100, 10)
    every = mode.pick(100, 50, 5)
    with tempfile.TemporaryDirectory(prefix="gpt-simple-bench-eval-") as out:
        cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.toml"),
               "--training.output_dir", out, "--training.max_steps", str(steps), "--eval.every_steps", str(every),
               "--training.log_steps", "1", "--training.tensorboard", "false", *mode.overrides(),
               *(["--eval.tokens", "2048"] if mode.smoke else [])]
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"train.py exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    evals = [float(m.group(1)) for m in map(EVAL_LINE.match, proc.stdout.splitlines()) if m]
    return [row("share of the default demo run spent evaluating", sum(evals), wall, sum(evals) / wall, "report",
                unit="s", note=f"{len(evals)} evaluations in a {steps}-step run (eval every {every} and at the end); "
                               f"against the process's wall time, set-up included")]


def run(mode: Mode) -> list[dict]:
    return rate_rows(mode) + share_rows(mode)


if __name__ == "__main__":
    sys.exit(main_for(run, __doc__.splitlines()[0]))
