"""Tasks: the units of work that a worker turns into token arrays, one dataclass per kind of input.

sources.py cuts the input files into tasks in the main process; pool.py runs each one in a worker, which
calls its `run`. A task is small (a path and a byte range, or at most CHUNK_BYTES of data) because it crosses
a process boundary.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar


@dataclass
class Worker:
    """What every task needs besides its own data; built once per worker process."""
    tokenizer: object
    field: str = "text"


@dataclass
class Result:
    docs: list = field(default_factory=list)       # token arrays, in input order
    problems: list = field(default_factory=list)   # (line or None, category, detail)
    lines: int = 0
    blank: int = 0

    def encode(self, worker: Worker, text: str, line: int | None, empty: tuple[str, str]) -> None:
        tokens = worker.tokenizer.encode(text) if text.strip() else None
        if tokens is None or len(tokens) == 0:
            self.problems.append((line, *empty))
        else:
            self.docs.append(tokens)


@dataclass(kw_only=True)
class Task:
    path: str
    first_line: int = 1   # number of the task's first line (or row)
    last: bool = True     # the file's last task
    size: int = 0         # input bytes it covers (progress)
    file_no: int = 0      # which input file and which of its tasks: where a resumed build continues
    task_no: int = 0

    # A file of records (JSONL lines, Parquet rows) whose tasks gave no record at all is reported as empty.
    records: ClassVar[bool] = False
    # The worker numbered its lines from 1: the byte range does not say how many lines precede it.
    relative_lines: ClassVar[bool] = False
    unit: ClassVar[str] = ""    # how a warning names a line: FILE:12, or FILE:row 12

    def where(self, line: int | None) -> str:
        return self.path if line is None else f"{self.path}:{self.unit}{line}"

    def run(self, worker: Worker) -> Result:
        result = Result()
        try:
            self.fill(result, worker)
        except OSError as e:
            result.problems.append((None, "unreadable file", f"cannot read ({e.strerror or e})"))
        return result

    def fill(self, result: Result, worker: Worker) -> None:
        raise NotImplementedError


@dataclass(kw_only=True)
class Problem(Task):
    """Something wrong that the main process found while cutting the file (empty, unreadable, corrupt)."""
    category: str
    detail: str
    line: int | None = None

    def fill(self, result: Result, worker: Worker) -> None:
        result.problems.append((self.line, self.category, self.detail))


@dataclass(kw_only=True)
class TextFile(Task):
    """A whole text file: one document."""

    def fill(self, result: Result, worker: Worker) -> None:
        text = read_text(self.path, result)
        if text is not None:
            result.encode(worker, text, None, ("empty file", "empty file"))


@dataclass(kw_only=True)
class JsonlRange(Task):
    """Bytes [start, end) of a plain JSONL file, whole lines; the worker reads them itself."""
    start: int
    end: int
    records: ClassVar[bool] = True
    relative_lines: ClassVar[bool] = True

    def fill(self, result: Result, worker: Worker) -> None:
        with open(self.path, "rb") as f:
            f.seek(self.start)
            data = f.read(self.end - self.start)
        jsonl_lines(result, worker, data, self.first_line)


@dataclass(kw_only=True)
class JsonlLines(Task):
    """Whole JSONL lines that travel with the task (a compressed file cannot be cut into byte ranges)."""
    data: bytes
    records: ClassVar[bool] = True

    def fill(self, result: Result, worker: Worker) -> None:
        jsonl_lines(result, worker, self.data, self.first_line)


@dataclass(kw_only=True)
class Texts(Task):
    """Rows of one text column (Parquet), read by the main process; None is a null value."""
    texts: list
    records: ClassVar[bool] = True
    unit: ClassVar[str] = "row "

    def fill(self, result: Result, worker: Worker) -> None:
        for row, text in enumerate(self.texts, self.first_line):
            if text is None:
                result.problems.append((row, "no text field", "null text"))
            else:
                result.encode(worker, text, row, ("empty text", "empty text"))


def jsonl_lines(result: Result, worker: Worker, data: bytes, first_line: int) -> None:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    result.lines = len(lines)
    name, problems = worker.field, result.problems
    for line, raw in enumerate(lines, first_line):
        if not raw.strip():
            result.blank += 1
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            problems.append((line, "not UTF-8", f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"))
            continue
        except json.JSONDecodeError as e:
            problems.append((line, "bad JSON", f"bad JSON ({e.msg.removesuffix(' at')} at column {e.colno})"))
            continue
        if not isinstance(record, dict):
            problems.append((line, "not a JSON object", f"not a JSON object ({type(record).__name__})"))
            continue
        text = record.get(name)
        if text is None:
            problems.append((line, "no text field", f"no field {name!r}"))
        elif not isinstance(text, str):
            problems.append((line, "text not a string", f"field {name!r} is not a string ({type(text).__name__})"))
        else:
            result.encode(worker, text, line, ("empty text", f"empty {name!r}"))


def read_text(path: str, result: Result) -> str | None:
    """The file as text without a byte-order mark; None (and a problem noted) if it is not UTF-8."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        result.problems.append((line, "not UTF-8", f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {column})"))
        return None
    return text.removeprefix("\ufeff")
