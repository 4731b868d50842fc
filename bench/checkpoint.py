"""Checkpoint benchmark: how long the training loop blocks for an async save, against a synchronous save.

GPT-2 124M (configs/gpt2.toml) + AdamW state (initialised by one real training step), FSDP2 on one process,
saved through gpt_simple.checkpoint.CheckpointManager with the trainer's model part
(gpt_simple.state.ModelOptimizer) and its step counter:

  * baseline: a synchronous save (what shutdown / final saves do): DCP write of every shard + commit;
  * ours: an async periodic save, with the loop around it doing real training steps of the same model
    (forward + backward of one short sequence, AdamW step) as the trainer does: save() returns after
    get_state_dict and starting the staging copy (into CPU buffers the manager allocates once and reuses);
    the copy overlaps the next forward/backward, and the optimizer step waits for it (before_update); the
    write runs in DCP's background thread; the commit (marker + rename) happens in the loop.

Blocking is the time the loop cannot run, as the trainer records it (the commit record's blocking_s: save()
until it returns + the optimizer step's wait for staging + the commit). The background copy and write compete
with the loop for cores, memory bandwidth and the GIL, a cost blocking alone would hide: two rows compare the
loop's steps/s while a save is in flight with its steps/s with none (measured interleaved).

The last row runs the real train.py on configs/tiny.toml with one async save halfway: its step time after the
save against before it (a save must leave nothing behind that slows the steps after it).

    python bench/checkpoint.py            # 5 sync + 5 async saves after a warm-up async save
    python bench/checkpoint.py --quick    # 1 + 1
    python bench/checkpoint.py --dir /fast/disk   # where to write (default: a temp dir, removed afterwards)
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cli import SMOKE_MODEL, Mode, main_for  # noqa: E402
from bench.launch import ROOT, TrainRun, scratch_dir  # noqa: E402
from bench.models import load  # noqa: E402
from bench.stats import median, spread  # noqa: E402
from bench.table import row  # noqa: E402

STEP_TOKENS = 32  # tokens per bench training step: short, so that a save spans several steps


def _build(mode: Mode, device_choice: str):
    import torch

    from gpt_simple.model import GPT
    from gpt_simple.optim import build_optimizer
    from gpt_simple.parallel import init_distributed, parallelize

    config, shrink = ((ROOT / "configs" / "tiny.toml", SMOKE_MODEL) if mode.smoke
                      else (ROOT / "configs" / "gpt2.toml", []))
    cfg = load(config, [*shrink, "--training.compile", "false", "--training.device", device_choice])
    d = init_distributed(device_choice)
    torch.manual_seed(0)
    model = parallelize(GPT(cfg.model), cfg.training, d.device)
    optimizer = build_optimizer(model, cfg.optimizer, d.device)
    x = torch.randint(0, cfg.model.vocab_size, (1, 16), device=d.device)
    _, loss = model(x, x)
    loss.backward()
    optimizer.step()  # one real step: AdamW's exp_avg / exp_avg_sq exist and are non-trivial
    optimizer.zero_grad(set_to_none=True)
    return cfg, d, model, optimizer


def _train_step(model, optimizer, mgr, x) -> None:
    """One training step as the trainer takes it, including its wait for a save's staging copy."""
    _, loss = model(x, x)
    loss.backward()
    mgr.before_update()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _idle_rate(step, steps: int) -> float:
    """Training steps per second with no save in flight."""
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def _async_save(mgr, n: int, step) -> dict:
    """One periodic save as the loop sees it: save() returns, the loop trains (its optimizer step waiting for
    the staging copy) until the write is done, then commits at the start of the next step."""
    start = time.perf_counter()
    mgr.save(n, "periodic", asynchronous=True)
    steps = 0
    while True:
        step()
        steps += 1
        if not mgr.save_in_flight():
            break
    busy = time.perf_counter() - start
    record = mgr.maybe_commit(False)
    return {**_done(mgr, record), "step_rate": steps / busy, "steps": steps, "busy_s": busy}


def _sync_save(mgr, n: int) -> dict:
    return _done(mgr, mgr.save(n, "periodic", asynchronous=False))


def _done(mgr, record: dict) -> dict:
    """Delete the checkpoint now, outside the timed part (in training, retention deletes it in a background
    thread long before the next save; here it would compete with the next measurement)."""
    shutil.rmtree(mgr.last_committed.path)
    return record


def _staging_profile(mgr) -> tuple[float, float]:
    """(get_state_dict seconds, staging-copy seconds) measured on their own, buffers already allocated."""
    t0 = time.perf_counter()
    state = mgr.parts["model"].state_dict()
    t1 = time.perf_counter()
    staged = mgr.stager().stage(state)
    if hasattr(staged, "result"):
        staged.result()
    return t1 - t0, time.perf_counter() - t1


def run(mode: Mode = Mode(), directory: str | None = None, device: str = "auto", verbose: bool = False) -> list[dict]:
    import torch

    from gpt_simple.checkpoint import CheckpointManager
    from gpt_simple.parallel import shutdown_distributed
    from gpt_simple.runtime import setup_logging
    from gpt_simple.state import ModelOptimizer, TrainState

    if verbose:
        setup_logging(0)  # each save's commit line
    reps = mode.pick(5, 1, 1)
    out = Path(tempfile.mkdtemp(prefix="gpt-simple-bench-ckpt-", dir=directory))
    try:
        cfg, d, model, optimizer = _build(mode, device)
        n_params = sum(p.numel() for p in model.parameters())
        train_state = TrainState()
        parts = {"model": ModelOptimizer(model, optimizer, cfg.model), "train": train_state}
        mgr = CheckpointManager(out, parts, d.device, d.rank, keep_last_k=0)
        x = torch.randint(0, cfg.model.vocab_size, (1, STEP_TOKENS), device=d.device)

        def train() -> None:
            _train_step(model, optimizer, mgr, x)
            train_state.step += 1

        first = _async_save(mgr, 1, train)  # allocates the staging buffers once
        sync, asyn, idle = [], [], []
        for _ in range(reps):  # interleaved, so drift in disk speed and machine load hits all alike
            sync.append(_sync_save(mgr, train_state.step))
            idle.append(_idle_rate(train, 3))
            asyn.append(_async_save(mgr, train_state.step, train))
            # the training time this save cost: its in-flight period minus what its steps take undisturbed
            asyn[-1]["lost_s"] = asyn[-1]["busy_s"] - asyn[-1]["steps"] / idle[-1]
        state_s, stage_s = _staging_profile(mgr)
        size = asyn[-1]["bytes"] or 0
    finally:
        shutdown_distributed()
        shutil.rmtree(out, ignore_errors=True)

    sync_total = median([r["total_s"] for r in sync])
    blocking = median([r["blocking_s"] for r in asyn])
    during, undisturbed = median([r["step_rate"] for r in asyn]), median(idle)
    where = f"{d.device.type}, {n_params / 1e6:.0f}M params + AdamW, {size / 2**30:.2f} GiB"
    vs_sync = "baseline: a synchronous save of the same state (DCP write + commit), median"
    return [
        row(f"checkpoint: loop blocking per async save ({where})", blocking, sync_total, blocking / sync_total,
            "≤ 0.10", unit="s", note=f"async blocking {spread([r['blocking_s'] for r in asyn], 's')}; sync total "
                                     f"{spread([r['total_s'] for r in sync], 's')}"),
        row("checkpoint: first async save of a launch, blocking (its copy allocates the buffers)",
            first["blocking_s"], sync_total, first["blocking_s"] / sync_total, "report", unit="s", note=vs_sync),
        row("checkpoint: async save total (staging + background write + commit)",
            median([r["total_s"] for r in asyn]), sync_total, median([r["total_s"] for r in asyn]) / sync_total,
            "report", unit="s"),
        row("checkpoint: profile: get_state_dict (in the loop)", state_s, sync_total, state_s / sync_total,
            "report", unit="s"),
        row("checkpoint: profile: staging copy into reused buffers (overlaps forward/backward)", stage_s,
            sync_total, stage_s / sync_total, "report", unit="s"),
        row(f"checkpoint: loop speed while a save is in flight ({STEP_TOKENS}-token steps; baseline: none in "
            f"flight)", during, undisturbed, during / undisturbed, "report", unit="steps/s"),
        row("checkpoint: training time lost per async save (in-flight time - its steps' undisturbed time)",
            median([r["lost_s"] for r in asyn]), sync_total, median([r["lost_s"] for r in asyn]) / sync_total,
            "report", unit="s",
            note=f"{spread([r['lost_s'] for r in asyn], 's')}; a synchronous save loses its whole duration"),
        _after_first_save(mode),
    ]


def _after_first_save(mode: Mode) -> dict:
    """train.py on configs/tiny.toml (0.1 s steps, where per-op overhead shows): the step time of the logged
    windows after its one async save has committed, against the windows before it. A save used to leave a
    helper thread with an OpenMP team of its own, after which every step was 30-40 % slower on 2 cores (see
    gpt_simple.runtime.one_thread_here)."""
    steps, save_at, log = mode.pick((240, 120, 10), (120, 60, 10), (16, 8, 2))
    run = TrainRun(scratch_dir("after-save") / "run", [
        *mode.overrides(), "--training.max_steps", str(steps), "--training.save_steps", str(save_at),
        "--training.log_steps", str(log), "--optimizer.warmup_steps", "5", "--training.peak_flops", "1e12"],
        config=ROOT / "configs" / "tiny.toml", threads=mode.threads(), name="train.py (tiny)").start().finish()
    tokens = run.metrics()[0]["tokens"] / log  # tokens per step
    step_s = {r["step"]: tokens / r["tokens_per_s"] for r in run.metrics()}
    # skip the first window (start-up) and the two around the save in flight
    before = [s for k, s in step_s.items() if 2 * log <= k <= save_at]
    after = [s for k, s in step_s.items() if save_at + 2 * log < k]
    return row("checkpoint: step time after a checkpoint / before it (train.py, configs/tiny.toml)",
               median(after), median(before), median(after) / median(before), "≤ 1.05", unit="s",
               note=f"median of {len(after)} and {len(before)} logged windows of {log} steps")


def options(p) -> None:
    p.add_argument("--dir", dest="directory", help="folder to write the checkpoints in (default: system temp dir)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--verbose", action="store_true", help="print each save's commit line")


if __name__ == "__main__":
    sys.exit(main_for(run, __doc__.splitlines()[0], options=options))
