"""Building what a benchmark measures in its own process: the config with overrides, the model's size and FLOPs,
and the real Trainer, built exactly as `gpt-simple train` builds it (gpt_simple.launch.run).
"""
from __future__ import annotations

import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench.launch import BENCH_CONFIG, ROOT

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def load(config: Path = BENCH_CONFIG, overrides: list[str] = ()):
    from gpt_simple.config import load_config
    return load_config(config, list(overrides))


def step_tokens(overrides: list[str] = (), config: Path = BENCH_CONFIG) -> tuple[int, int]:
    """(tokens per optimizer step, model FLOPs per token) of `config` with these overrides."""
    import torch

    from gpt_simple.model import GPT, count_params, flops_per_token
    cfg = load(config, overrides)
    with torch.device("meta"):
        model = GPT(cfg.model)
    n = count_params(model, cfg.model)
    return cfg.training.global_batch_size * cfg.data.seq_len, flops_per_token(cfg.model, n, cfg.data.seq_len)


@contextmanager
def trainer_in_process(cfg, force: bool = False):
    """The real gpt_simple.trainer.Trainer for `cfg`, with its process group (world size 1 outside torchrun,
    the torchrun group inside it); closed and the group destroyed on exit. Its console log stays quiet (no
    setup_logging): the benchmark prints the table."""
    from gpt_simple.config import validate_world
    from gpt_simple.parallel import init_distributed, mesh_shape, shutdown_distributed
    from gpt_simple.run_dir import RunDir
    from gpt_simple.launch import open_run
    from gpt_simple.trainer import Trainer
    from gpt_simple.clock import Clock
    from gpt_simple.shutdown import resolve_deadline
    started = time.time()
    with ExitStack() as closing:
        closing.callback(shutdown_distributed)
        d = init_distributed(cfg.training.device)
        validate_world(cfg, d.world_size)
        d.mesh_shape = mesh_shape(cfg.parallel.replicate_degree, d.world_size)
        journal = open_run(RunDir(cfg.training.output_dir), d, cfg.training.resume, force)
        clock = Clock(resolve_deadline(cfg.training.max_runtime_seconds), cfg.training.walltime_reserve_seconds,
                      process_start=started)  # set-up counted from here, not from this process's start
        yield Trainer(cfg, d, journal, closing, clock)
