"""Checkpoint benchmark: how long the training loop blocks for an async save, against a synchronous save.

GPT-2 124M (configs/gpt2.toml) + AdamW state (initialised by one real training step), FSDP2 on one process,
saved through gpt_simple.checkpoint.CheckpointManager exactly as the trainer saves:

  * baseline: a synchronous save (what shutdown / final saves do): DCP write of every shard + commit;
  * ours: an async periodic save: the loop blocks for get_state_dict + staging (a copy of the state into
    CPU buffers the manager allocates once and reuses) + the commit (marker + rename), while the write runs
    in DCP's background thread.

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


def _async_save(mgr, step: int) -> dict:
    """One periodic save as the loop sees it: save() returns after staging; the loop polls until the write
    is done (here: sleeping, in training: running steps), then commits."""
    mgr.save(step, {"bench": True}, "periodic", asynchronous=True)
    while mgr.pending_vote():
        time.sleep(0.005)
    mgr.maybe_commit(False)
    return _done(mgr)


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
    state = mgr._app_state()
    t1 = time.perf_counter()
    mgr.stager().stage(state)
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
        step = 0
        first = _async_save(mgr, step := step + 1)  # allocates the staging buffers once
        sync, asyn = [], []
        for _ in range(reps):  # interleaved, so drift in disk speed hits both alike
            sync.append(_sync_save(mgr, step := step + 1))
            asyn.append(_async_save(mgr, step := step + 1))
        state_s, stage_s = _staging_profile(mgr)
        size = asyn[-1]["bytes"] or 0
        mgr.close()
    finally:
        shutdown_distributed()
        shutil.rmtree(out, ignore_errors=True)

    sync_total = statistics.median(r["total_s"] for r in sync)
    blocking = statistics.median(r["blocking_s"] for r in asyn)
    total = statistics.median(r["total_s"] for r in asyn)
    where = f"{d.device.type}, {n_params / 1e6:.0f}M params + AdamW, {size / 2**30:.2f} GiB"
    return [
        {"metric": f"checkpoint: loop blocking per async save, s ({where})", "ours": blocking,
         "baseline": sync_total, "ratio": blocking / sync_total, "target": TARGET_BLOCKING_RATIO},
        {"metric": "checkpoint: first async save blocking (allocates staging buffers), s",
         "ours": first["blocking_s"], "baseline": sync_total, "ratio": first["blocking_s"] / sync_total,
         "target": None},
        {"metric": "checkpoint: async save total (staging + background write + commit), s", "ours": total,
         "baseline": sync_total, "ratio": total / sync_total, "target": None},
        {"metric": "checkpoint: blocking profile: get_state_dict, s", "ours": state_s, "baseline": sync_total,
         "ratio": state_s / sync_total, "target": None},
        {"metric": "checkpoint: blocking profile: staging copy into reused buffers, s", "ours": stage_s,
         "baseline": sync_total, "ratio": stage_s / sync_total, "target": None},
    ]


def format_table(rows: list[dict]) -> str:
    width = max(len(r["metric"]) for r in rows)
    lines = [f"{'metric':<{width}}  {'ours':>9}  {'baseline':>9}  {'ratio':>7}  target",
             f"{'':-<{width}}  {'':->9}  {'':->9}  {'':->7}  ------"]
    for r in rows:
        target = "-" if r["target"] is None else f"<= {r['target']:.2f} " + \
            ("ok" if r["ratio"] <= r["target"] else "MISSED")
        lines.append(f"{r['metric']:<{width}}  {r['ours']:>9.3f}  {r['baseline']:>9.3f}  {r['ratio']:>7.3f}  {target}")
    return "\n".join(lines)


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
    return 0 if rows[0]["ratio"] <= TARGET_BLOCKING_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
