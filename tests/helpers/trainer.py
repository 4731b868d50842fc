"""The real Trainer built in this process (world size 1, a one-rank gloo group), as launch.run builds it, for
unit tests that drive its steps, its journal and its clock without a subprocess."""
from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from helpers.train import TINY


@contextmanager
def trainer_here(out: Path, data: Path, *overrides: str, drill=None, deadline=None):
    from gpt_simple.clock import Clock
    from gpt_simple.config import load_config
    from gpt_simple.drill import NO_DRILL
    from gpt_simple.launch import open_run
    from gpt_simple.parallel import init_distributed, mesh_shape, shutdown_distributed
    from gpt_simple.run_dir import RunDir
    from gpt_simple.shutdown import Deadline
    from gpt_simple.trainer import Trainer
    args = [*TINY, "--data.dir", str(data), "--data.demo", "false", "--training.output_dir", str(out), *overrides]
    cfg = load_config(args[1], args[2:])
    with ExitStack() as closing:
        closing.callback(shutdown_distributed)
        d = init_distributed(cfg.training.device)
        d.mesh_shape = mesh_shape(cfg.parallel.replicate_degree, d.world_size)
        journal = open_run(RunDir(out), d, cfg.training.resume, False)
        closing.callback(journal.lease.release)
        clock = Clock(deadline or Deadline(None, "none", []), cfg.training.walltime_reserve_seconds,
                      drill or NO_DRILL, process_start=time.time())  # set-up counted from here, not the worker's start
        yield Trainer(cfg, d, journal, closing, clock)
