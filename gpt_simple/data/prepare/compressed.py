"""Compressed JSONL (.jsonl.gz, .jsonl.zst): decompressed as a stream by the main process, since a compressed
file cannot be cut into byte ranges without reading it; its lines travel with the tasks. Lines are taken one
by one so that a corrupt or truncated stream keeps every line before the damage."""
from __future__ import annotations

import gzip
import os
import zlib
from functools import partial
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from gpt_simple.data.prepare.errors import optional
from gpt_simple.data.prepare.tasks import JsonlLines, Problem, Task

READ_BYTES = 1 << 16   # compressed bytes per read: what one read can expand to stays small


def stream_tasks(path: Path, chunk_bytes: int, lines: Callable[[BinaryIO], Iterator[bytes]], name: str,
                 errors: tuple) -> Iterator[Task]:
    """Tasks of about chunk_bytes of whole lines from `lines(raw)`. An exception in `errors` ends the file with
    one problem (EOFError: the stream is truncated), after a task with the lines read before it."""
    path_str, line, read = str(path), 1, 0
    raw = open(path, "rb")
    buf: list[bytes] = []
    size = 0

    def task(last: bool) -> Task:
        nonlocal line, read, buf, size
        done = raw.tell()
        t = JsonlLines(path=path_str, data=b"".join(buf), first_line=line, last=last, size=done - read)
        line, read, buf, size = line + len(buf), done, [], 0
        return t

    try:
        try:
            for record in lines(raw):
                buf.append(record)
                size += len(record)
                if size >= chunk_bytes:
                    yield task(False)
        except errors as e:
            if buf:
                yield task(False)
            what = "truncated" if isinstance(e, EOFError) else f"corrupt ({e})"
            yield Problem(path=path_str, category=f"corrupt {name}", line=line,
                          size=os.path.getsize(path_str) - read,
                          detail=f"{name} stream {what} after line {line - 1}: the rest of the file")
            return
        if buf or line > 1:
            yield task(True)
        else:
            yield Problem(path=path_str, category="empty file", detail="empty file", size=os.path.getsize(path_str))
    finally:
        raw.close()


def _gzip_lines(raw: BinaryIO) -> Iterator[bytes]:
    with gzip.open(raw, "rb") as f:
        yield from f


def gzip_tasks(path: Path, chunk_bytes: int) -> Iterator[Task]:
    return stream_tasks(path, chunk_bytes, _gzip_lines, "gzip", (EOFError, OSError, zlib.error))


def _zstd_lines(zstd, raw: BinaryIO) -> Iterator[bytes]:
    """Lines across every frame of the file. zstandard's stream reader ends quietly at a truncated frame; a
    decompressobj tells (eof), so a cut-off file is reported rather than taken as complete."""
    dctx = zstd.ZstdDecompressor()
    frame, in_frame, pending = dctx.decompressobj(), False, []
    while block := raw.read(READ_BYTES):
        while block:
            out, in_frame = frame.decompress(block), True
            block = b""
            if frame.eof:
                block, frame, in_frame = frame.unused_data, dctx.decompressobj(), False
            parts = out.split(b"\n")
            if len(parts) == 1:
                pending.append(out)
                continue
            yield b"".join(pending) + parts[0] + b"\n"
            for part in parts[1:-1]:
                yield part + b"\n"
            pending = [parts[-1]]
    if in_frame:
        raise EOFError("zstd frame cut off")
    if any(pending):
        yield b"".join(pending)


def zstd_tasks(path: Path, chunk_bytes: int) -> Iterator[Task]:
    zstd = optional("zstandard", "zstd", f"{path}: reading .jsonl.zst")
    return stream_tasks(path, chunk_bytes, partial(_zstd_lines, zstd), "zstd", (EOFError, OSError, zstd.ZstdError))
