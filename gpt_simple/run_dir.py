"""The run folder (training.output_dir): the name of every file in it, and the only helpers that write there.

The write policy is one for the whole project: a file that decides what happens next (run_state.json, HALTED,
config.toml, a checkpoint's markers) is written to a temporary name, fsynced and renamed over the old one, so a
reader sees the old file or the new one, never half of either. Logs (events.jsonl, metrics.jsonl,
data_audit.jsonl) are appended without fsync: a kill can tear their last line, and every reader skips a torn
line. Import-light (no torch): the signal handlers and `status.py` use it.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path


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
    # the W&B run of this training run (its id, and the highest step sent per kind): gpt_simple/wandb_log.py
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


# -- writing ------------------------------------------------------------------------------------------------
def strict_json(value):
    """NaN and infinities become null: every file here is strict JSON that any reader can parse."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` survive a power loss (the entry lives in the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, text: str) -> None:
    """Write and fsync a new file (inside a directory that is not visible yet, e.g. a checkpoint being saved)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text`: readers see the old content or the new, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write_durable(tmp, text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, json.dumps(strict_json(obj), indent=1, allow_nan=False) + "\n")


def append_jsonl(path: Path, obj) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(strict_json(obj), allow_nan=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL log, skipping a line torn by a kill."""
    if not Path(path).exists():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the records with step <= last_step: a resumed run writes the later steps again, identically."""
    if Path(path).exists():
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
