"""Checkpoint benchmark: how long the training loop blocks for an async save, against a synchronous save.

GPT-2 124M (configs/gpt2.toml) + AdamW state (initialised by one real training step), FSDP2 on one process,
saved through gpt_simple.checkpoint.CheckpointManager exactly as the trainer saves:

  * baseline: a synchronous save (what shutdown / final saves do): DCP write of every shard + commit;
  * ours: an async periodic save, with the loop around it doing real training steps of the same model
    (forward + backward of one short sequence, AdamW step) as the trainer does: save() returns after
    get_state_dict and starting the staging copy (into CPU buffers the manager allocates once and reuses);
    the copy overlaps the next forward/backward, and the optimizer step waits for it (before_update); the
    write runs in DCP's background thread; the commit (marker + rename) happens in the loop.

Blocking is the time the loop cannot run, as the trainer records it (CheckpointManager's blocking_s: save()
until it returns + the optimizer step's wait for staging + the commit). The background copy and write compete
with the loop for cores, memory bandwidth and the GIL, a cost blocking alone would hide: the last row compares
the loop's steps/s while a save is in flight with its steps/s with none (measured interleaved).

The last row runs the real train.py on configs/tiny.toml with one async save halfway: its step time after the
save against before it (a save must leave nothing behind that slows the steps after it).

    python bench/checkpoint.py            # 5 sync + 5 async saves after a warm-up async save
    python bench/checkpoint.py --quick    # 1 + 1
    python bench/checkpoint.py --dir /fast/disk   # where to write (default: a temp dir, removed afterwards)

`run(quick)` returns the table rows as dicts for bench/run.py.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_BLOCKING_RATIO = 0.10
STEP_TOKENS = 32  # tokens per bench training step: short, so that a save spans several steps


def _build(device_choice: str):
    import torch

    from gpt_simple.config import load_config
    from gpt_simple.model import GPT
    from gpt_simple.optim import build_optimizer
    from gpt_simple.parallel import init_distributed, parallelize

    cfg = load_config(ROOT / "configs" / "gpt2.toml",
                      ["--training.compile", "false", "--training.device", device_choice])
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
    mgr.save(n, {"bench": True}, "periodic", asynchronous=True)
    steps = 0
    while True:
        step()
        steps += 1
        if not mgr.pending_vote():
            break
    busy = time.perf_counter() - start
    mgr.maybe_commit(False)
    return {**_done(mgr), "step_rate": steps / busy, "steps": steps, "busy_s": busy}


def _sync_save(mgr, step: int) -> dict:
    mgr.save(step, {"bench": True}, "periodic", asynchronous=False)
    return _done(mgr)


def _done(mgr) -> dict:
    """Delete the checkpoint now, outside the timed part (in training, retention deletes it in a background
    thread long before the next save; here it would compete with the next measurement)."""
    shutil.rmtree(mgr.last_committed.path)
    return mgr.history[-1]


def _staging_profile(mgr) -> tuple[float, float]:
    """(get_state_dict seconds, staging-copy seconds) measured on their own, buffers already allocated."""
    t0 = time.perf_counter()
    state = mgr._app_state(with_optimizer=True)
    t1 = time.perf_counter()
    staged = mgr.stager().stage(state)
    if hasattr(staged, "result"):
        staged.result()
    return t1 - t0, time.perf_counter() - t1


def run(quick: bool = False, directory: str | None = None, device: str = "auto", verbose: bool = False) -> list[dict]:
    from gpt_simple.checkpoint import CheckpointManager
    from gpt_simple.parallel import shutdown_distributed

    reps = 1 if quick else 5
    out = Path(tempfile.mkdtemp(prefix="gpt-simple-bench-ckpt-", dir=directory))
    log = print if verbose else (lambda *_: None)
    try:
        cfg, d, model, optimizer = _build(device)
        n_params = sum(p.numel() for p in model.parameters())
        mgr = CheckpointManager(out, model, optimizer, d.device, d.rank, keep_last_k=0, log=log)
        import torch
        x = torch.randint(0, cfg.model.vocab_size, (1, STEP_TOKENS), device=d.device)
        train = lambda: _train_step(model, optimizer, mgr, x)  # noqa: E731
        n = 0
        first = _async_save(mgr, n := n + 1, train)  # allocates the staging buffers once
        sync, asyn, idle = [], [], []
        for _ in range(reps):  # interleaved, so drift in disk speed and machine load hits all alike
            sync.append(_sync_save(mgr, n := n + 1))
            idle.append(_idle_rate(train, 3))
            asyn.append(_async_save(mgr, n := n + 1, train))
            # the training time this save cost: its in-flight period minus what its steps take undisturbed
            asyn[-1]["lost_s"] = asyn[-1]["busy_s"] - asyn[-1]["steps"] / idle[-1]
        state_s, stage_s = _staging_profile(mgr)
        size = asyn[-1]["bytes"] or 0
        mgr.close()
    finally:
        shutdown_distributed()
        shutil.rmtree(out, ignore_errors=True)

    sync_total = statistics.median(r["total_s"] for r in sync)
    blocking = statistics.median(r["blocking_s"] for r in asyn)
    total = statistics.median(r["total_s"] for r in asyn)
    during, undisturbed = statistics.median(r["step_rate"] for r in asyn), statistics.median(idle)
    where = f"{d.device.type}, {n_params / 1e6:.0f}M params + AdamW, {size / 2**30:.2f} GiB"
    spread = lambda xs: f"{min(xs):.3f}..{max(xs):.3f} over {len(xs)}"
    return [
        _row(f"checkpoint: loop blocking per async save, s ({where})", blocking, sync_total,
             TARGET_BLOCKING_RATIO, f"async blocking {spread([r['blocking_s'] for r in asyn])}; sync total "
             f"{spread([r['total_s'] for r in sync])}"),
        _row("checkpoint: first async save of a launch, blocking (its copy allocates the buffers), s",
             first["blocking_s"], sync_total),
        _row("checkpoint: async save total (staging + background write + commit), s", total, sync_total),
        _row("checkpoint: profile: get_state_dict (in the loop), s", state_s, sync_total),
        _row("checkpoint: profile: staging copy into reused buffers (overlaps forward/backward), s", stage_s,
             sync_total),
        _row(f"checkpoint: loop speed while a save is in flight, steps/s (baseline: none in flight; "
             f"{STEP_TOKENS}-token steps)", during, undisturbed),
        _row("checkpoint: training time lost per async save (in-flight time - its steps' undisturbed time), s",
             statistics.median(r["lost_s"] for r in asyn), sync_total,
             note=f"{spread([r['lost_s'] for r in asyn])}; a synchronous save loses its whole duration"),
        _after_first_save(quick),
    ]


def _after_first_save(quick: bool) -> dict:
    """train.py on configs/tiny.toml (0.1 s steps, where per-op overhead shows): the step time of the logged
    windows after its one async save has committed, against the windows before it. A save used to leave a
    helper thread with an OpenMP team of its own, after which every step was 30-40 % slower on 2 cores (see
    gpt_simple.parallel.one_thread_here)."""
    from bench.common import TrainRun, scratch_dir
    steps, save_at, log = (120, 60, 10) if quick else (240, 120, 10)
    run = TrainRun(scratch_dir("after-save") / "run", [
        "--training.max_steps", str(steps), "--training.save_steps", str(save_at), "--training.log_steps", str(log),
        "--optimizer.warmup_steps", "5", "--training.peak_flops", "1e12"], config=ROOT / "configs" / "tiny.toml",
        name="train.py (tiny)").start()
    if run.wait_exit(timeout=900) != 0:
        raise RuntimeError(f"train.py (tiny) failed:\n{run.log_tail()}")
    tokens = run.metrics()[0]["tokens"] / log  # tokens per step
    step_s = {r["step"]: tokens / r["tokens_per_s"] for r in run.metrics()}
    # skip the first window (start-up) and the two around the save in flight
    before = [s for k, s in step_s.items() if 2 * log <= k <= save_at]
    after = [s for k, s in step_s.items() if save_at + 2 * log < k]
    return _row("checkpoint: step time after a checkpoint / before it (train.py, configs/tiny.toml), s",
                statistics.median(after), statistics.median(before), 1.05,
                f"median of {len(after)} and {len(before)} logged windows of {log} steps")


def _row(metric: str, ours: float, baseline: float, target: float | None = None, note: str = "") -> dict:
    ratio = ours / baseline if baseline else float("nan")
    return {"metric": metric, "ours": ours, "baseline": baseline, "ratio": ratio,
            "target": None if target is None else f"<= {target:.2f}",
            "ok": None if target is None else ratio <= target, "note": note}


def format_table(rows: list[dict]) -> str:
    width = max(len(r["metric"]) for r in rows)
    lines = [f"{'metric':<{width}}  {'ours':>9}  {'baseline':>9}  {'ratio':>7}  target",
             f"{'':-<{width}}  {'':->9}  {'':->9}  {'':->7}  ------"]
    for r in rows:
        target = "-" if r["target"] is None else f"{r['target']} " + ("ok" if r["ok"] else "MISSED")
        lines.append(f"{r['metric']:<{width}}  {r['ours']:>9.3f}  {r['baseline']:>9.3f}  {r['ratio']:>7.3f}  {target}")
    notes = [f"  {r['metric'].split(',')[0]}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(lines + (["notes:"] + notes if notes else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one save of each kind instead of five")
    parser.add_argument("--dir", help="folder to write the checkpoints in (default: system temp dir)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--verbose", action="store_true", help="print each save's commit line")
    args = parser.parse_args(argv)
    rows = run(args.quick, args.dir, args.device, args.verbose)
    print("baseline = a synchronous save of the same state (DCP write + commit), median of the runs")
    print(format_table(rows))
    return 0 if rows[0]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
