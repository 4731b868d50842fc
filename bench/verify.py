"""Checkpoint verification benchmark: checking a checkpoint's recorded CRC-32 checksums against loading it.

GPT-2 124M (configs/gpt2.toml) + AdamW state (one real step), saved once through CheckpointManager exactly as the
trainer saves (sync). Then, interleaved, N times each:

  * load: CheckpointManager.load with verification off (manifests, meta.json, every tensor through DCP);
  * verify: what a load adds with training.verify_checkpoints = true (every file's CRC-32, large reads);
  * also the commit-side cost: checksumming the files right after writing them (the write threads do it).

Both read the files just written (page cache warm), which is the common case of a resume on the node that
saved; from cold storage both get slower by the same read. Goal (issue 13): verify <= 25 % of load.

    python bench/verify.py             # GPT-2 124M, 5 rounds
    python bench/verify.py --quick     # the tiny model, 2 rounds
    python bench/verify.py --dir /fast/disk
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build(quick: bool):
    import torch

    from gpt_simple.config import load_config
    from gpt_simple.model import GPT
    from gpt_simple.optim import build_optimizer
    from gpt_simple.state import ModelOptimizer
    config = ROOT / "configs" / ("tiny.toml" if quick else "gpt2.toml")
    cfg = load_config(config, ["--training.compile", "false"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    optimizer = build_optimizer(model, cfg.optimizer, torch.device("cpu"))
    x = torch.randint(0, cfg.model.vocab_size, (1, 16))
    model(x, x)[1].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"model": ModelOptimizer(model, optimizer, cfg.model)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the tiny model, 2 rounds")
    p.add_argument("--rounds", type=int, default=0)
    p.add_argument("--dir", dest="directory", help="where to write (default: a temp dir, removed afterwards)")
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)

    import torch

    from gpt_simple.checkpoint import CheckpointManager, list_committed
    from gpt_simple.checkpoint.files import checkpoint_files, checksum_files, verify_checkpoint
    work = Path(tempfile.mkdtemp(prefix="gpt-simple-verify-", dir=args.directory))
    try:
        parts = build(args.quick)
        mgr = CheckpointManager(work / "checkpoints", parts, torch.device("cpu"), rank=0, verify=False)
        record = mgr.save(1, "final")
        info = list_committed(mgr.root)[-1]
        size = record["bytes"]
        loads, verifies, hashes = [], [], []
        for _ in range(rounds):
            start = time.perf_counter()
            mgr.load(info)
            loads.append(time.perf_counter() - start)
            start = time.perf_counter()
            assert verify_checkpoint(info.path)
            verifies.append(time.perf_counter() - start)
            start = time.perf_counter()
            checksum_files(info.path, checkpoint_files(info.path))
            hashes.append(time.perf_counter() - start)
        load, verify, hashing = (statistics.median(v) for v in (loads, verifies, hashes))
        print(f"checkpoint: {size / 2**30:.2f} GiB ({'tiny' if args.quick else 'GPT-2 124M'} + AdamW), "
              f"median of {rounds}")
        print("| | seconds | vs load |\n| --- | ---: | ---: |")
        print(f"| load (verification off) | {load:.3f} ({min(loads):.3f}-{max(loads):.3f}) | 1 |")
        print(f"| verify (CRC-32 of every file) | {verify:.3f} ({min(verifies):.3f}-{max(verifies):.3f}) | "
              f"**{verify / load:.3f}** (goal <= 0.25) |")
        print(f"| checksum at save (same bytes) | {hashing:.3f} | {hashing / load:.3f} |")
        print(f"verify throughput: {size / verify / 2**30:.2f} GiB/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
