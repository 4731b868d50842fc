"""The run folder (training.output_dir): the name of every file in it.

What writes there follows the project's one write policy, gpt_simple/fileio.py: a file that decides what
happens next (run_state.json, HALTED, config.toml, a checkpoint's markers) is replaced atomically (temporary
name, fsync, rename); logs (events.jsonl, metrics.jsonl, data_audit.jsonl) are appended without fsync, and every
reader skips a line torn by a kill. fileio's helpers are re-exported here for the modules that import them from
run_dir. Import-light (no torch): the signal handlers and `status.py` use it.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from gpt_simple.fileio import (RecordsError, append_jsonl, drop_torn_line, fsync_dir, read_jsonl, strict_json,
                               truncate_jsonl, write_atomic, write_durable, write_json_atomic)

__all__ = ["RunDir", "is_run", "quarantined", "RecordsError", "drop_torn_line", "append_jsonl", "fsync_dir", "read_jsonl", "strict_json", "truncate_jsonl",
           "write_atomic", "write_durable", "write_json_atomic"]


class RunDir:
    """Paths under one output_dir. Only this class spells their names."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    state = property(lambda self: self.path / "run_state.json")
    events = property(lambda self: self.path / "events.jsonl")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    tensorboard = property(lambda self: self.path / "tensorboard")
    checkpoints = property(lambda self: self.path / "checkpoints")
    halted = property(lambda self: self.path / "HALTED")
    stop = property(lambda self: self.path / "STOP")
    config = property(lambda self: self.path / "config.toml")
    audit = property(lambda self: self.path / "data_audit.jsonl")
    logs = property(lambda self: self.path / "logs")
    lease = property(lambda self: self.path / "LEASE")  # one live job per run: gpt_simple/lease.py
    # the W&B run of this training run (its id, and the highest step sent per kind): gpt_simple/journal/wandb_sink.py
    wandb = property(lambda self: self.path / "wandb.json")

    def run_files(self) -> list[Path]:
        """What a run writes: removed by training.resume = 'scratch' with --force (logs/ belong to the
        orchestrator and stay; so do W&B's own files: a new wandb.json means a new W&B run beside the old)."""
        return [self.checkpoints, self.state, self.events, self.metrics, self.tensorboard, self.audit,
                self.halted, self.stop, self.config, self.wandb]

    def clear(self) -> None:
        for path in self.run_files():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def is_run(path: str | Path) -> bool:
    return RunDir(path).state.exists()


# A checkpoint that failed to load as damaged is moved aside (checkpoint/loader.py) as corrupt-NAME, or
# corrupt-NAME-SECONDS when a checkpoint of that name was moved aside before.
QUARANTINED_RE = re.compile(r"^corrupt-step-(\d+)(?:-shutdown|-final)?(?:-\d+)?$")


def quarantined(checkpoints: Path) -> list[tuple[str, int]]:
    """(folder name, step) of every damaged checkpoint moved aside under a run's checkpoints folder."""
    root = Path(checkpoints)
    found = [(p.name, QUARANTINED_RE.match(p.name)) for p in sorted(root.iterdir())] if root.is_dir() else []
    return [(name, int(m.group(1))) for name, m in found if m and (root / name).is_dir()]
