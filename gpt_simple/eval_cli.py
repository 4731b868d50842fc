"""`gpt-simple eval CHECKPOINT_OR_OUTPUT_DIR`: the validation loss of any committed checkpoint.

    gpt-simple eval outputs/tiny [--data.dir DIR] [--eval.dir DIR] [--tokens N] [--json]
    torchrun --nproc_per_node 4 -m gpt_simple eval outputs/run --tokens 1000000

It evaluates as the run does (eval.py's Evaluator on the run's recorded config: the same sequences, the same
micro-batches, the model sharded with FSDP2 over every process), so at a step where the run evaluated it prints
that evaluation's figures, to float-reduction tolerance.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gpt_simple.checkpoint import CheckpointError, read_meta
from gpt_simple.config import ConfigError, load_config
from gpt_simple.data.shards import ShardError, bucket_dirs
from gpt_simple.export import ExportError, load_checkpoint_model, resolve_checkpoint
from gpt_simple.runtime import log, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpt-simple eval", description="Validation loss of a committed checkpoint.")
    p.add_argument("path", metavar="CHECKPOINT_OR_OUTPUT_DIR", help="a checkpoints/step-N directory, or a run "
                                                                    "directory (its newest committed checkpoint)")
    p.add_argument("--data.dir", dest="data_dir", help="data folder (default: the run's data.dir)")
    p.add_argument("--eval.dir", dest="eval_dir", help="validation buckets prepared separately (default: the "
                                                       "run's eval.dir, else DATA_DIR/BUCKET/val)")
    p.add_argument("--tokens", type=int, help="validation tokens per bucket (default: the run's eval.tokens)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: the run's training.device")
    p.add_argument("--json", action="store_true", help="print the evaluation record as one JSON line")
    return p


def _bucket_names(cfg) -> list[str]:
    """The run's buckets: those of data.dir, else (only a separate split is here) those of eval.dir."""
    for folder in (Path(cfg.data.dir), Path(cfg.eval.dir) if cfg.eval.dir else None):
        if folder is not None and folder.is_dir():
            names = [p.name for p in bucket_dirs(folder)]
            if names:
                return names
    raise ShardError(f"data.dir {cfg.data.dir!r}: no buckets here (pass --data.dir, or --eval.dir for a split "
                     f"prepared separately)")


def eval_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    overrides = [f"--{k}={v}" for k, v in (("data.dir", args.data_dir), ("eval.dir", args.eval_dir),
                                           ("eval.tokens", args.tokens), ("training.device", args.device))
                 if v is not None]
    try:
        ckpt = resolve_checkpoint(args.path)
        meta = read_meta(ckpt)
        cfg = load_config(None, overrides, base=(meta.get("run") or {}).get("config"))
        names = _bucket_names(cfg)
    except (ExportError, CheckpointError, ConfigError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _evaluate(cfg, ckpt, meta, names, args.json)


def _evaluate(cfg, ckpt: Path, meta: dict, names: list[str], as_json: bool) -> int:
    import torch

    from gpt_simple.eval import Evaluator, describe, validation_buckets
    from gpt_simple.export import build_model
    from gpt_simple.parallel import init_distributed, parallelize, shutdown_distributed
    d = init_distributed(cfg.training.device, cfg.training.setup_timeout_seconds)
    setup_logging(d.rank)
    try:
        state, model_cfg, _, _ = load_checkpoint_model(ckpt)
        model = parallelize(build_model(state, model_cfg).train(), cfg.training, d.device)
        cfg.eval.at_end = True  # evaluate: the evaluator refuses a run without any split instead of a silent nothing
        evaluator = Evaluator(cfg, model, d.device, d.rank, d.world_size, validation_buckets(cfg, names))
        started = time.perf_counter()
        with torch.no_grad():
            record = evaluator.evaluate(int(meta["step"]))
        seconds = time.perf_counter() - started
        if d.world_size > 1:
            torch.distributed.barrier()  # no rank tears the group down while another still uses it
    except (CheckpointError, ShardError) as e:
        if d.rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    if d.rank == 0:
        record["checkpoint"] = str(ckpt)
        if as_json:
            print(json.dumps(record))
        else:
            log.info(f"eval {ckpt} (step {record['step']}) | {describe(record)} | {record['tokens']:,} tokens in "
                     f"{seconds:.1f}s")
    return 0
