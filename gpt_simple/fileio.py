"""The only helpers that write files: one write policy for the whole project.

A file that decides what happens next (run_state.json, HALTED, config.toml, a checkpoint's markers, a data
index, a bucket build's progress record) is written to a temporary name, fsynced and renamed over the old one,
so a reader sees the old file or the new one, never half of either (write_atomic; sync_dir=True also makes the
rename itself survive a power loss). A file written inside a folder that is not visible yet is written and
fsynced in place (write_durable); a file that must not exist yet is created exclusively (create_durable: O_EXCL,
atomic on NFSv3+ and Lustre). Logs (events.jsonl, metrics.jsonl, data_audit.jsonl, builds.log) are appended
without fsync: a kill can tear their last line, which readers skip and the next launch drops (drop_torn_line,
recorded); any other line that is not a record is damage, an error naming the file and line (RecordsError).

Temporary names are unique per host, process and thread, so several hosts (a shared filesystem) and threads can
replace the same file at once: the last rename wins, and each is whole.

Import-light (no torch): the signal handlers, `status.py` and the data preparation use it.
"""
from __future__ import annotations

import json
import math
import os
import socket
import threading
from collections.abc import Iterable
from pathlib import Path

# What write_durable / write_atomic write: text, bytes, or pieces of bytes written one after the other (large
# buffers are not joined first).
Data = str | bytes | bytearray | memoryview | Iterable


def strict_json(value):
    """NaN and infinities become null: every file here is strict JSON that any reader can parse."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` survive a power loss (the entry lives in the directory)."""
    _fsync_path(path)


def fsync_file(path: Path) -> None:
    """Make an existing file's contents survive a power loss (written by a stream that did not fsync)."""
    _fsync_path(path)


def _write_all(f, data: Data) -> None:
    if isinstance(data, (str, bytes, bytearray, memoryview)):
        f.write(data)
    else:
        for piece in data:
            f.write(piece)
    f.flush()
    os.fsync(f.fileno())


def _mode(data: Data) -> str:
    return "w" if isinstance(data, str) else "wb"


def write_durable(path: Path, data: Data) -> None:
    """Write and fsync a new file (inside a directory that is not visible yet, e.g. a checkpoint being saved)."""
    with open(path, _mode(data)) as f:
        _write_all(f, data)


def create_durable(path: Path, data: Data, mode: int = 0o644) -> None:
    """Create `path` with `data`, fsynced, only if it does not exist (O_CREAT | O_EXCL: of several creators
    exactly one succeeds); FileExistsError otherwise. A kill between the create and the write leaves an empty or
    torn file: its readers must allow for that."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    with os.fdopen(fd, _mode(data)) as f:
        _write_all(f, data)


def temp_name(path: Path) -> Path:
    """A temporary name beside `path`, hidden, unique to this host, process and thread."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}")


def write_atomic(path: Path, data: Data, sync_dir: bool = False) -> None:
    """Replace `path` with `data`: readers see the old content or the new, never a mix. sync_dir: also fsync
    the folder, so that the rename survives a power loss (for a record that a later process trusts)."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        write_durable(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if sync_dir:
        fsync_dir(path.parent)


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, json.dumps(strict_json(obj), indent=1, allow_nan=False) + "\n")


def publish(tmp: Path, path: Path) -> None:
    """Rename a finished temporary file (written by a stream, e.g. a shard) over `path`: atomic, not durable by
    itself (the caller fsyncs the file and its folder before it records it as done)."""
    os.replace(tmp, path)


def append_jsonl(path: Path, obj) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(strict_json(obj), allow_nan=False) + "\n")


class RecordsError(ValueError):
    """A line of a JSONL log that is not a record and not its torn last line: the file is damaged."""


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL log, skipping a line torn by a kill (its last); RecordsError for a bad line elsewhere."""
    return _records(Path(path))[0] if Path(path).exists() else []


def _records(path: Path) -> tuple[list[dict], str, int | None]:
    """(the records, the file's text, the number of its last line when a kill tore it: unparsable)."""
    text = path.read_text()
    lines = text.splitlines()
    records, torn = [], None
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError as e:
            if number < len(lines):
                raise RecordsError(f"{path}, line {number}: not a JSON record ({e}); the file is damaged and "
                                   f"nothing was rewritten") from None
            torn = number
    return records, text, torn


def drop_torn_line(path: Path) -> tuple[int, str] | None:
    """Before a launch appends to a JSONL log: a last line torn by a kill is dropped (else the next record would
    be glued to it); a last record without its newline gets one. (line number, the torn text) when a line was
    dropped, for the caller to record; else None."""
    path = Path(path)
    if not path.exists():
        return None
    _, text, torn = _records(path)
    lines = text.splitlines()
    if torn is not None:
        write_atomic(path, "".join(line + "\n" for line in lines[:torn - 1]))
        return torn, lines[torn - 1]
    if text and not text.endswith("\n"):
        write_atomic(path, text + "\n")
    return None


def truncate_jsonl(path: Path, last_step: int) -> int:
    """Keep the records with step <= last_step: a resumed run writes the later steps again, identically. Returns
    the highest step removed (0: none). The file is rewritten only when a record goes or a line was torn."""
    if not Path(path).exists():
        return 0
    records, text, torn = _records(Path(path))
    dropped = [r.get("step", 0) for r in records if r.get("step", 0) > last_step]
    if dropped or torn is not None or (text and not text.endswith("\n")):
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in records if r.get("step", 0) <= last_step))
    return max(dropped, default=0)
