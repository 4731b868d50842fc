"""Small helpers every layer shares: the logger, an all-reduce of a named record, one OpenMP thread per helper
thread. Nothing here knows about models, data or checkpoints."""
from __future__ import annotations

import dataclasses
import logging
import sys
import threading

import torch
import torch.distributed as dist

log = logging.getLogger("gpt_simple")


class _ConsoleFormatter(logging.Formatter):
    """Progress lines as they are; warnings and errors prefixed with their level, as the CLI's own errors are."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def setup_logging(rank: int = 0) -> None:
    """Progress to stdout and warnings/errors to stderr, on rank 0; other ranks report errors only (a warning
    that every rank agrees on would otherwise print once per rank)."""
    formatter = _ConsoleFormatter()
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(_Below(logging.WARNING))
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(formatter)
    log.handlers[:] = [out, err]
    log.setLevel(logging.INFO if rank == 0 else logging.ERROR)
    log.propagate = False


def all_reduce_max(values: list[float], device: torch.device, group=None) -> list[float]:
    """Several flags or figures in one small all-reduce (MAX)."""
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def agree(record, device: torch.device, group=None):
    """The same dataclass with every field the maximum over ranks (booleans: any rank), in one all-reduce."""
    fields = dataclasses.fields(record)
    reduced = all_reduce_max([float(getattr(record, f.name)) for f in fields], device, group)
    return type(record)(**{f.name: _like(getattr(record, f.name), value) for f, value in zip(fields, reduced)})


def _like(example, value: float):
    """An agreed value in the type of this rank's own: a flag, a count, or a figure."""
    if isinstance(example, bool):
        return value > 0
    return int(value) if isinstance(example, int) else value


def one_thread_here() -> None:
    """Run this helper thread's torch ops (data prefetch, checkpoint staging and writing) on one OpenMP thread.

    A helper thread that runs a parallel op gets an OpenMP team of its own, which outlives the op. With more
    OpenMP threads alive than cores, libgomp stops letting the training thread's team spin between parallel
    regions, so every op after that pays a futex wake-up: on the 2-core CPU demo, every step after the first
    checkpoint was 30-40 % slower. The main thread's own thread count is not changed (torch.set_num_threads sets
    the OpenMP count of the calling thread only, plus the default for threads that have not run an op yet).
    """
    if threading.current_thread() is not threading.main_thread() and torch.get_num_threads() != 1:
        torch.set_num_threads(1)
