"""What every benchmark's command line shares: the mode (full, --quick, --smoke), the `python bench/X.py`
entry point, the description of the machine, and a clean exit on SIGTERM.

    --quick      fewer repetitions: about a third of the time
    --smoke      every code path once, on a small model, with 1-2 steps: checks that the benchmark works (the
                 test suite runs it); its figures mean nothing
    --data-dir   a built corpus to read instead of the demo corpus in data/demo (built there on first use)
"""
from __future__ import annotations

import argparse
import os
import platform
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from bench.table import format_table, write_json

# --smoke: the bench config's shape, shrunk until a step takes milliseconds.
SMOKE_MODEL = ["--model.n_layer", "2", "--model.n_embd", "64", "--model.n_head", "2", "--model.block_size", "64",
               "--data.seq_len", "64", "--training.global_batch_size", "8", "--training.micro_batch_size", "4",
               "--optimizer.warmup_steps", "1"]


@dataclass(frozen=True)
class Mode:
    level: str = "full"            # "full", "quick" or "smoke"
    data_dir: str | None = None

    @property
    def quick(self) -> bool:
        return self.level == "quick"

    @property
    def smoke(self) -> bool:
        return self.level == "smoke"

    def pick(self, full, quick, smoke):
        return {"full": full, "quick": quick, "smoke": smoke}[self.level]

    def threads(self, nproc: int = 1) -> int:
        """OpenMP threads per process: the cores shared out over the ranks; one in smoke mode (the test suite
        runs beside other tests)."""
        return 1 if self.smoke else max(1, (os.cpu_count() or 1) // nproc)

    def data(self) -> list[str]:
        """Overrides that point a run at --data-dir (nothing when the demo corpus is used)."""
        return ["--data.dir", str(Path(self.data_dir).resolve()), "--data.demo", "false"] if self.data_dir else []

    def overrides(self) -> list[str]:
        """Config overrides for a run of the bench model in this mode: the smoke model, the data."""
        return [*(SMOKE_MODEL if self.smoke else []), *self.data()]


def add_mode_args(p: argparse.ArgumentParser) -> None:
    level = p.add_mutually_exclusive_group()
    level.add_argument("--quick", action="store_true", help="fewer repetitions: about a third of the time")
    level.add_argument("--smoke", action="store_true",
                       help="every code path once on a small model (a check that the benchmark works; the "
                            "figures mean nothing)")
    p.add_argument("--data-dir", help="a built corpus to train on instead of the demo corpus (data/demo)")
    p.add_argument("--json", help="also write the rows and a description of the machine to this file")


def mode_from(args: argparse.Namespace) -> Mode:
    return Mode("smoke" if args.smoke else "quick" if args.quick else "full", args.data_dir)


def start(mode: Mode) -> Mode:
    """This process's side of the mode: in smoke mode its own torch ops (the in-process benchmarks) run on one
    thread, as its children do."""
    if mode.smoke:
        import torch
        torch.set_num_threads(1)
    return mode


def machine() -> dict:
    import torch
    model = ""
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                model = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host": platform.node(), "cpu": model, "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "loadavg_at_start": os.getloadavg()}


def exit_cleanly_on_termination() -> None:
    """SIGTERM / SIGHUP end a benchmark through SystemExit, so that its `finally` blocks kill the runs it
    started (by default they would outlive it) and its scratch folders are removed."""
    def leave(signum, frame):
        raise SystemExit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, leave)


def main_for(run, description: str, argv: list[str] | None = None, options=None) -> int:
    """`python bench/X.py [--quick|--smoke] [--data-dir DIR] [--json PATH]`: run(mode, **options), print the
    table. `options(parser)` adds a benchmark's own arguments, handed to run() by name."""
    exit_cleanly_on_termination()
    p = argparse.ArgumentParser(description=description)
    add_mode_args(p)
    if options is not None:
        options(p)
    a = p.parse_args(argv)
    own = {k: v for k, v in vars(a).items() if k not in ("quick", "smoke", "data_dir", "json")}
    started = time.time()
    rows = run(start(mode_from(a)), **own)
    print(format_table(rows))
    print(f"\n({time.time() - started:.0f}s; load average now {os.getloadavg()[0]:.1f})")
    if a.json:
        write_json(a.json, rows, machine=machine(), mode=mode_from(a).level)
    return 0
