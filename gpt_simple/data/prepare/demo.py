"""The embedded demo corpus: the running Python's standard library as code, prose and comments.

Nothing to download, and it goes through the same pipeline as any input, so the demo exercises what users run.
"""
from __future__ import annotations

import ast
import io
import sys
import sysconfig
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from gpt_simple.data.prepare.build import write_bucket
from gpt_simple.data.prepare.errors import PrepareError
from gpt_simple.data.prepare.pool import default_workers
from gpt_simple.data.prepare.report import Summary
from gpt_simple.data.prepare.tasks import Result, Task, TextFile, Worker, read_text
from gpt_simple.data.prepare.writer import has_shards
from gpt_simple.data.shards import VAL_SPLIT

DEMO_BUCKETS = ("code", "prose", "comments")
DEMO_DEFAULT = ("code", "prose")
DEMO_CODE_BYTES = 6_000_000
# Validation split per demo bucket: about 1% of its tokens, enough for a stable loss on the tiny model.
DEMO_VAL_DOCS = {"code": 12, "prose": 150, "comments": 12}


def stdlib_sources(limit_bytes: int = DEMO_CODE_BYTES) -> list[Path]:
    """The running Python's stdlib modules (tests and tools left out), sorted, up to limit_bytes in all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo"}
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        size = path.stat().st_size
        if total + size > limit_bytes:
            break
        if size:
            files.append(path)
        total += size
    return files


def docstrings(source: str) -> list[str]:
    """The module's, classes' and functions' docstrings longer than 40 characters, in ast.walk order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                    ast.ClassDef))]
    return [d for d in (ast.get_docstring(n) for n in nodes) if d and len(d) > 40]


def comments(source: str) -> str:
    """The module's # comments, one per line; empty if they are under 80 characters in all."""
    found = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                found.append(tok.string)
    except (tokenize.TokenError, SyntaxError):
        pass
    text = "\n".join(found)
    return text if len(text) >= 80 else ""


@dataclass(kw_only=True)
class Docstrings(Task):
    """A module's docstrings: one document each."""

    def fill(self, result: Result, worker: Worker) -> None:
        text = read_text(self.path, result)
        for doc in docstrings(text) if text is not None else ():
            result.encode(worker, doc, None, ("empty text", "empty docstring"))


@dataclass(kw_only=True)
class Comments(Task):
    """A module's comments: one document, if there are enough of them."""

    def fill(self, result: Result, worker: Worker) -> None:
        text = read_text(self.path, result)
        doc = comments(text) if text is not None else ""
        if doc:
            result.encode(worker, doc, None, ("empty text", "no comments"))


TASKS = {"code": TextFile, "prose": Docstrings, "comments": Comments}


def _build(out_dir: Path, bucket: str, files: list[Path], **kwargs) -> Summary:
    def cut(path: Path) -> list[Task]:
        return [TASKS[bucket](path=str(path), size=path.stat().st_size)]
    return write_bucket(out_dir, bucket, "byte", files, cut, plan={"demo": bucket}, val_docs=DEMO_VAL_DOCS[bucket],
                        inputs=[f"demo:{bucket} ({len(files)} stdlib modules of Python {sys.version.split()[0]})"],
                        **kwargs)


def prepare_demo(out_dir: str, buckets: Iterable[str] = DEMO_DEFAULT, workers: int = 0, quiet: bool = False,
                 force: bool = False) -> dict[str, Summary]:
    """Demo buckets from the running Python's stdlib (no download), through the same pipeline as any input:
    'code' (module sources, one document each), 'prose' (their docstrings), 'comments' (their # comments)."""
    unknown = [b for b in buckets if b not in DEMO_BUCKETS]
    if unknown:
        raise PrepareError(f"unknown demo bucket(s) {', '.join(map(repr, unknown))} (choose from "
                           f"{', '.join(DEMO_BUCKETS)})")
    files = stdlib_sources()
    total = sum(f.stat().st_size for f in files)
    out = {}
    for bucket in buckets:
        if not force and _complete(Path(out_dir) / bucket):
            if not quiet:
                print(f"bucket {bucket!r} -> {Path(out_dir) / bucket}: exists, kept (--force rebuilds it)")
            continue
        out[bucket] = _build(Path(out_dir), bucket, files, total_bytes=total,
                             workers=workers or default_workers(total), quiet=quiet,
                             force=force or has_shards(Path(out_dir) / bucket))
    return out


def ensure_demo(out_dir: str, buckets: Iterable[str] = DEMO_DEFAULT) -> None:
    """Build the demo buckets that are missing. Safe when several processes race: each builds in its own
    hidden folder and the first rename wins."""
    root = Path(out_dir)
    missing = [b for b in buckets if not _complete(root / b)]
    # In-process: cheap enough (a few seconds) and safe in a process that already runs torch threads.
    for bucket in missing:
        try:
            _build(root, bucket, stdlib_sources(), workers=1, quiet=True, force=has_shards(root / bucket))
        except PrepareError:
            if not _complete(root / bucket):
                raise


def _complete(folder: Path) -> bool:
    """A demo bucket with its validation split (one built before demo buckets had one is rebuilt)."""
    return has_shards(folder) and has_shards(folder / VAL_SPLIT)
