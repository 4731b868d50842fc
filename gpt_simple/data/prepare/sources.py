"""Finding the input files and cutting each one into tasks, in the main process.

A plain JSONL file is cut into byte ranges of whole lines that the workers read themselves; compressed JSONL
(compressed.py) and Parquet (parquet.py) are read here as streams, and their records travel with the tasks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from gpt_simple.data.prepare.compressed import gzip_tasks, zstd_tasks
from gpt_simple.data.prepare.errors import PrepareError, optional
from gpt_simple.data.prepare.parquet import check_parquet, parquet_tasks
from gpt_simple.data.prepare.tasks import JsonlRange, Problem, Task, TextFile

CHUNK_BYTES = 4 << 20     # input bytes per task


@dataclass(frozen=True)
class Reading:
    """How the main process reads the inputs (the JSONL field is the workers' business: see tasks.Worker)."""
    chunk_bytes: int = CHUNK_BYTES
    text_column: str = "text"


def text_tasks(path: Path, how: Reading) -> Iterator[Task]:
    yield TextFile(path=str(path), size=path.stat().st_size)


def jsonl_tasks(path: Path, how: Reading) -> Iterator[Task]:
    name, size = str(path), path.stat().st_size
    if size == 0:
        yield Problem(path=name, category="empty file", detail="empty file")
        return
    with open(path, "rb") as f:
        start = 0
        while start < size:
            f.seek(min(start + how.chunk_bytes, size))
            if f.tell() < size:
                f.readline()
            end = f.tell()
            yield JsonlRange(path=name, start=start, end=end, last=end >= size, size=end - start)
            start = end


@dataclass(frozen=True)
class Format:
    cut: Callable[[Path, Reading], Iterator[Task]]
    check: Callable[[Path, Reading], None] | None = None   # before any work: missing library, wrong column


# By suffix, in the order messages list them.
FORMATS = {
    ".txt": Format(text_tasks),
    ".jsonl": Format(jsonl_tasks),
    ".jsonl.gz": Format(lambda path, how: gzip_tasks(path, how.chunk_bytes)),
    ".jsonl.zst": Format(lambda path, how: zstd_tasks(path, how.chunk_bytes),
                         lambda path, how: optional("zstandard", "zstd", f"{path}: reading .jsonl.zst")),
    ".parquet": Format(lambda path, how: parquet_tasks(path, how.chunk_bytes, how.text_column),
                       lambda path, how: check_parquet(path, how.text_column)),
}


def format_list(joiner: str = " or ") -> str:
    *most, final = FORMATS
    return f"{', '.join(most)}{joiner}{final}"


def format_of(path: Path) -> Format | None:
    # Longest suffix first: a.jsonl.gz is gzip, not .gz of something unknown.
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if path.name.endswith(suffix):
            return FORMATS[suffix]
    return None


def input_files(paths: Iterable[str]) -> list[Path]:
    """The files to read, in order: each argument in turn, a folder's readable files sorted."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and format_of(f))
        elif p.is_file():
            if not format_of(p):
                raise PrepareError(f"{p}: unsupported input (expected {format_list()}, or a folder)")
            files.append(p)
        else:
            raise PrepareError(f"{p}: no such file or folder")
    return files


def check_inputs(files: list[Path], how: Reading) -> None:
    """What would stop the run anyway, found before any work: a missing library, a missing text column."""
    for path in files:
        check = format_of(path).check
        if check:
            check(path, how)


def file_tasks(path: Path, how: Reading = Reading()) -> Iterator[Task]:
    """Tasks for one input file, in order; a file that cannot be read becomes one Problem task."""
    try:
        yield from format_of(path).cut(path, how)
    except OSError as e:
        yield Problem(path=str(path), category="unreadable file", detail=f"cannot read ({e.strerror or e})")
