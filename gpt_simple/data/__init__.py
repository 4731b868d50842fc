"""Data: on-disk shards, preparation, the curriculum schedule and the global sequence stream.

Importing this package does not import torch (`gpt-simple prepare` and its worker processes stay light);
the stream module, which does, is loaded on first use.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gpt_simple.config import Config
from gpt_simple.data.curriculum import BucketExhausted, DataError
from gpt_simple.data.shards import ShardError, open_buckets

if TYPE_CHECKING:
    from gpt_simple.data.stream import DataStream

__all__ = ["BucketExhausted", "DataError", "DataStream", "ShardError", "build_stream", "demo_buckets",
           "open_data"]


def __getattr__(name: str):
    if name == "DataStream":
        from gpt_simple.data.stream import DataStream
        return DataStream
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def demo_buckets(cfg: Config) -> tuple[str, ...]:
    """The demo buckets a config needs: those its curriculum names, else the default pair."""
    from gpt_simple.data.prepare import DEMO_BUCKETS, DEMO_DEFAULT
    named = sorted({b for phase in cfg.data.curriculum for b in phase.get("mix", {})})
    if named and all(b in DEMO_BUCKETS for b in named):
        return tuple(named)
    return DEMO_DEFAULT


def open_data(cfg: Config) -> dict:
    """The buckets of data.dir, checked against the model's vocabulary (no demo build here)."""
    buckets = open_buckets(Path(cfg.data.dir))
    first = next(iter(buckets.values()))
    if first.vocab_size > cfg.model.vocab_size:
        raise DataError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the vocabulary of the shards in "
                        f"data.dir ({first.vocab_size}, tokenizer {first.tokenizer!r}); set model.vocab_size to at "
                        f"least {first.vocab_size} (a multiple of 64 is fastest)")
    return buckets


def build_stream(cfg: Config, rank: int, world_size: int) -> "DataStream":
    """Open data.dir (building the demo corpus first if asked) and make this rank's view of the stream."""
    import torch.distributed as dist

    from gpt_simple.data.stream import DataStream
    if cfg.data.demo:
        if rank == 0:
            from gpt_simple.data.prepare import ensure_demo
            ensure_demo(cfg.data.dir, demo_buckets(cfg))
        if dist.is_initialized():
            dist.barrier()
    buckets = open_data(cfg)
    return DataStream(buckets, cfg.data.curriculum, cfg.data.seq_len, cfg.data.seed,
                      cfg.data.allow_bucket_exhaustion, cfg.training.global_batch_size,
                      cfg.training.micro_batch_size, rank, world_size, cfg.data.prefetch, epochs(cfg),
                      cfg.data.amend)


def epochs(cfg: Config) -> dict[str, int]:
    """Pass limit per bucket: data.epochs where it names the bucket, else data.max_epochs."""
    from gpt_simple.data.shards import bucket_dirs
    buckets = [p.name for p in bucket_dirs(Path(cfg.data.dir))] if Path(cfg.data.dir).is_dir() else []
    unknown = sorted(set(cfg.data.epochs) - set(buckets))
    if unknown:
        raise DataError(f"data.epochs: unknown bucket {unknown[0]!r} (buckets in data.dir: "
                        f"{', '.join(buckets) or 'none'})")
    return {b: int(cfg.data.epochs.get(b, cfg.data.max_epochs)) for b in buckets}
