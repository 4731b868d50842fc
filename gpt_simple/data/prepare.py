"""`gpt-simple prepare`: text / JSONL / the embedded demo corpus → token shards of one named bucket.

    gpt-simple prepare INPUT... --out DATA --bucket NAME [--tokenizer byte|tiktoken:NAME|hf:FILE.json]
                                [--strict] [--workers N] [--field text] [--force]
    gpt-simple prepare --demo DATA [--buckets code,prose,comments] [--force]

Inputs are .txt files (one document each), .jsonl or .jsonl.gz files (one {"text": ...} object per line), or
folders of them (searched recursively, in sorted order). The input is cut into tasks of at most CHUNK_BYTES
(one .txt file, or a run of whole JSONL lines), which a process pool parses and tokenizes while the main
process writes the results in input order: the output does not depend on the number of workers, and memory
stays bounded by the tasks in flight (2 × workers + 2) whatever the size of the input.

A malformed record (bad JSON, no string text field, empty text, not UTF-8, an empty or unreadable file, a
corrupt .gz) is reported with its file and line. By default it is skipped, printed as a warning and counted
in the summary (and in DATA/NAME/prepare.json); with --strict the first one is fatal and nothing is written.
The bucket is built in a hidden folder and renamed into place at the end: it appears whole or not at all.
"""
from __future__ import annotations

import argparse
import ast
import gzip
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import sysconfig
import time
import tokenize
import zlib
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator


from gpt_simple.data.shards import ShardError, ShardWriter, dtype_for_vocab
from gpt_simple.data.tokenizer import get_tokenizer

SHARD_TOKENS = 1 << 28    # a new shard every 256M tokens keeps files a manageable size
CHUNK_BYTES = 4 << 20     # input bytes per task
SHOW_PROBLEMS = 50        # warnings printed one by one; the rest are counted (and listed in prepare.json)
KEEP_PROBLEMS = 10_000    # problems listed in prepare.json
DEMO_BUCKETS = ("code", "prose", "comments")
DEMO_DEFAULT = ("code", "prose")
DEMO_CODE_BYTES = 6_000_000
BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class PrepareError(ValueError):
    """Malformed input in strict mode, or input that cannot be used at all: one line for the user."""


# -- reading the inputs --------------------------------------------------------------------------------------------
def _kind(path: Path) -> str | None:
    name = path.name
    if name.endswith(".jsonl.gz"):
        return "jsonl.gz"
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".txt"):
        return "txt"
    return None


def input_files(paths: Iterable[str]) -> list[Path]:
    """The files to read, in order: each argument in turn, a folder's .txt/.jsonl/.jsonl.gz files sorted."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and _kind(f))
        elif p.is_file():
            if not _kind(p):
                raise PrepareError(f"{p}: unsupported input (expected .txt, .jsonl or .jsonl.gz, or a folder)")
            files.append(p)
        else:
            raise PrepareError(f"{p}: no such file or folder")
    return files


@dataclass
class Task:
    kind: str        # txt | jsonl-range | jsonl-bytes | problem | demo-code | demo-prose | demo-comments
    path: str
    arg: object = None
    first_line: int = 1   # line number of the task's first line (a range counts from 1: see write_bucket)
    last: bool = True     # the file's last task
    size: int = 0         # input bytes it covers (progress)


def file_tasks(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Task]:
    """Tasks for one input file. A plain JSONL file is cut into byte ranges of whole lines that the workers
    read themselves; a .gz is decompressed here (it cannot be cut) and its lines travel with the task."""
    kind, name = _kind(path), str(path)
    try:
        size = path.stat().st_size
        if kind == "txt":
            yield Task("txt", name, size=size)
        elif kind == "jsonl":
            if size == 0:
                yield Task("problem", name, ("empty file", "empty file", None))
                return
            with open(path, "rb") as f:
                start = 0
                while start < size:
                    f.seek(min(start + chunk_bytes, size))
                    if f.tell() < size:
                        f.readline()
                    end = f.tell()
                    yield Task("jsonl-range", name, (start, end), last=end >= size, size=end - start)
                    start = end
        else:
            yield from _gzip_tasks(path, chunk_bytes)
    except OSError as e:
        yield Task("problem", name, ("unreadable file", f"cannot read ({e.strerror or e})", None))


def _gzip_tasks(path: Path, chunk_bytes: int) -> Iterator[Task]:
    """Lines are read one by one so that a corrupt or truncated stream keeps every line before the damage."""
    name, line, read = str(path), 1, 0
    raw = open(path, "rb")
    buf: list[bytes] = []
    size = 0

    def task(last: bool) -> Task:
        nonlocal line, read, buf, size
        done = raw.tell()
        t = Task("jsonl-bytes", name, b"".join(buf), first_line=line, last=last, size=done - read)
        line, read, buf, size = line + len(buf), done, [], 0
        return t

    try:
        with gzip.open(raw, "rb") as f:
            try:
                for record in f:
                    buf.append(record)
                    size += len(record)
                    if size >= chunk_bytes:
                        yield task(False)
            except (EOFError, OSError, zlib.error) as e:
                if buf:
                    yield task(False)
                what = "truncated" if isinstance(e, EOFError) else f"corrupt ({e})"
                yield Task("problem", name, ("corrupt gzip", f"gzip stream {what} after line {line - 1}: "
                                             f"the rest of the file", line), size=os.path.getsize(name) - read)
                return
            if buf or line > 1:
                yield task(True)
            else:
                yield Task("problem", name, ("empty file", "empty file", None), size=os.path.getsize(name))
    finally:
        raw.close()


# -- the workers: parse and tokenize one task ------------------------------------------------------------------------
_TOKENIZER = None
_FIELD = "text"


def _init_worker(spec: str, field_name: str = "text") -> None:
    global _TOKENIZER, _FIELD
    _TOKENIZER, _FIELD = get_tokenizer(spec), field_name


@dataclass
class Result:
    docs: list = field(default_factory=list)       # token arrays, in input order
    problems: list = field(default_factory=list)   # (line or None, category, detail)
    lines: int = 0
    blank: int = 0


def _encode(result: Result, text: str, line: int | None, empty: tuple[str, str]) -> None:
    tokens = _TOKENIZER.encode(text) if text.strip() else None
    if tokens is None or len(tokens) == 0:
        result.problems.append((line, *empty))
    else:
        result.docs.append(tokens)


def _jsonl_lines(result: Result, data: bytes, first_line: int) -> None:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    result.lines = len(lines)
    for i, raw in enumerate(lines):
        line = first_line + i
        if not raw.strip():
            result.blank += 1
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            result.problems.append((line, "not UTF-8", f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"))
            continue
        except json.JSONDecodeError as e:
            result.problems.append((line, "bad JSON", f"bad JSON ({e.msg.removesuffix(' at')} at column {e.colno})"))
            continue
        if not isinstance(record, dict):
            result.problems.append((line, "not a JSON object", f"not a JSON object ({type(record).__name__})"))
            continue
        text = record.get(_FIELD)
        if text is None:
            result.problems.append((line, "no text field", f"no field {_FIELD!r}"))
        elif not isinstance(text, str):
            result.problems.append((line, "text not a string",
                                    f"field {_FIELD!r} is not a string ({type(text).__name__})"))
        else:
            _encode(result, text, line, ("empty text", f"empty {_FIELD!r}"))


def _read_text(path: str) -> tuple[str | None, tuple | None]:
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        return None, (line, "not UTF-8", f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {column})")
    return text.removeprefix("\ufeff"), None


def run_task(task: Task) -> Result:
    result = Result()
    try:
        if task.kind == "problem":
            category, detail, line = task.arg
            result.problems.append((line, category, detail))
        elif task.kind == "jsonl-range":
            start, end = task.arg
            with open(task.path, "rb") as f:
                f.seek(start)
                data = f.read(end - start)
            _jsonl_lines(result, data, task.first_line)
        elif task.kind == "jsonl-bytes":
            _jsonl_lines(result, task.arg, task.first_line)
        else:
            text, problem = _read_text(task.path)
            if problem:
                result.problems.append(problem)
            elif task.kind in ("txt", "demo-code"):
                _encode(result, text, None, ("empty file", "empty file"))
            elif task.kind == "demo-prose":
                for doc in docstrings(text):
                    _encode(result, doc, None, ("empty text", "empty docstring"))
            elif task.kind == "demo-comments":
                doc = comments(text)
                if doc:
                    _encode(result, doc, None, ("empty text", "no comments"))
            else:
                raise ValueError(f"unknown task kind {task.kind!r}")
    except OSError as e:
        result.problems.append((None, "unreadable file", f"cannot read ({e.strerror or e})"))
    return result


def results(tasks: Iterable[Task], tokenizer: str, field_name: str, workers: int) -> Iterator[tuple[Task, Result]]:
    """(task, result) in task order; with workers > 1 a pool works ahead, at most 2 × workers + 2 tasks."""
    if workers <= 1:
        _init_worker(tokenizer, field_name)
        for task in tasks:
            yield task, run_task(task)
        return
    # fork is cheap, but not safe once torch (and its threads) is loaded: then start clean interpreters.
    method = "fork" if "torch" not in sys.modules and sys.platform == "linux" else "spawn"
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer, field_name)) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append((task, pool.apply_async(run_task, (task,))))
            while len(pending) >= 2 * workers + 2:
                task_done, future = pending.popleft()
                yield task_done, future.get()
        while pending:
            task_done, future = pending.popleft()
            yield task_done, future.get()


# -- writing a bucket --------------------------------------------------------------------------------------------------
@dataclass
class Summary:
    bucket: str = ""
    folder: str = ""
    tokenizer: str = ""
    vocab_size: int = 0
    dtype: str = ""
    files: int = 0
    documents: int = 0
    tokens: int = 0
    shards: int = 0
    skipped: int = 0
    blank_lines: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    skipped_by_reason: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def line(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped_by_reason.items()))
        skipped = f"skipped {self.skipped} ({reasons})" if self.skipped else "skipped 0"
        blank = f", {self.blank_lines} blank lines ignored" if self.blank_lines else ""
        return (f"bucket {self.bucket!r} -> {self.folder}: {self.documents:,} documents, {self.tokens:,} tokens "
                f"({self.dtype}, tokenizer {self.tokenizer}) in {self.shards} shard(s) from {self.files} file(s); "
                f"{skipped}{blank}; {self.seconds:.1f}s, {self.tokens_per_second / 1e6:.2f}M tokens/s")


class BucketWriter:
    """Writes shards into a hidden DATA/.NAME.tmp-PID folder; commit() renames it to DATA/NAME."""

    def __init__(self, out_dir: Path, bucket: str, tok, shard_tokens: int = SHARD_TOKENS, force: bool = False):
        if not BUCKET_NAME.fullmatch(bucket):
            raise PrepareError(f"bucket name {bucket!r}: use letters, digits, '_', '-' and '.' "
                               f"(not starting with '.' or '-')")
        self.out, self.bucket, self.tok, self.shard_tokens = Path(out_dir), bucket, tok, shard_tokens
        self.final = self.out / bucket
        if self.final.exists() and not force and any(self.final.glob("*.idx")):
            raise PrepareError(f"{self.final}: bucket already exists (use --force to replace it, or choose "
                               f"another --bucket)")
        self.tmp = self.out / f".{bucket}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.writer: ShardWriter | None = None
        self.shards = 0

    def add(self, tokens) -> None:
        if self.writer is None or self.writer.n_tokens >= self.shard_tokens:
            if self.writer is not None:
                self.writer.close()
            self.writer = ShardWriter(self.tmp / f"shard-{self.shards:05d}", self.tok.vocab_size, self.tok.id,
                                      self.tok.eos)
            self.shards += 1
        self.writer.add(tokens)

    def commit(self, manifest: dict, replace: bool) -> bool:
        """Move the finished bucket into place; False if another process put one there first (not replace)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        (self.tmp / "prepare.json").write_text(json.dumps(manifest, indent=1) + "\n")
        trash = None
        if self.final.exists() and (replace or not any(self.final.glob("*.idx"))):
            trash = self.out / f".{self.bucket}.trash-{os.getpid()}"
            os.replace(self.final, trash)
        try:
            os.replace(self.tmp, self.final)
        except OSError:
            if not any(self.final.glob("*.idx")):
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)  # a concurrent prepare of the same bucket won
            return False
        finally:
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        return True

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_bucket(out_dir: Path, bucket: str, tokenizer: str, tasks: Iterable[Task], *, total_bytes: int = 0,
                 workers: int = 1, strict: bool = False, quiet: bool = False, field_name: str = "text",
                 force: bool = False, shard_tokens: int = SHARD_TOKENS, inputs: list[str] | None = None) -> Summary:
    """Tokenize `tasks` and write the documents, in order, as bucket out_dir/bucket."""
    start = time.time()
    tok = get_tokenizer(tokenizer)
    out = BucketWriter(Path(out_dir), bucket, tok, shard_tokens, force)
    summary = Summary(bucket=bucket, folder=str(out.final), tokenizer=tok.id, vocab_size=tok.vocab_size,
                      dtype=dtype_for_vocab(tok.vocab_size))
    reasons: Counter = Counter()
    progress = Progress(bucket, total_bytes, quiet)
    per_file: dict[str, int] = {}   # records seen per file
    lines_before: dict[str, int] = {}  # lines of a plain JSONL file before its current range
    shown = 0
    stream = results(tasks, tokenizer, field_name, workers)
    try:
        for task, result in stream:
            if task.path not in per_file:
                per_file[task.path] = 0
                summary.files += 1
            per_file[task.path] += len(result.docs) + len(result.problems)
            problems = list(result.problems)
            if task.kind == "jsonl-range":  # its worker numbered its lines from 1
                base = lines_before.get(task.path, 0)
                problems = [(line + base, category, detail) for line, category, detail in problems]
                lines_before[task.path] = base + result.lines
            if task.last and per_file[task.path] == 0 and task.kind in ("jsonl-range", "jsonl-bytes"):
                problems.append((None, "empty file", "empty file (no records, only blank lines)"))
            for line, category, detail in problems:
                where = task.path if line is None else f"{task.path}:{line}"
                if strict:
                    raise PrepareError(f"{where}: {detail} (--strict: stopped, nothing was written; "
                                       f"leave out --strict to skip malformed records)")
                summary.skipped += 1
                reasons[category] += 1
                if len(summary.problems) < KEEP_PROBLEMS:
                    summary.problems.append(f"{where}: {detail}")
                if shown < SHOW_PROBLEMS and not quiet:
                    progress.clear()
                    print(f"warning: skipped {where}: {detail}", file=sys.stderr, flush=True)
                    shown += 1
            for tokens in result.docs:
                out.add(tokens)
                summary.documents += 1
                summary.tokens += len(tokens)
            summary.blank_lines += result.blank
            summary.input_bytes += task.size
            progress.update(summary)
        if summary.documents == 0:
            raise PrepareError(f"{out.final}: no documents to write ({summary.skipped} malformed record(s) "
                               f"skipped, see the warnings above)")
        summary.shards = out.shards
        summary.skipped_by_reason = dict(reasons)
        summary.seconds = time.time() - start
        manifest = {"bucket": bucket, "tokenizer": tok.id, "vocab_size": tok.vocab_size, "eos": tok.eos,
                    "inputs": inputs or [], "created_at": time.time(), **asdict(summary)}
        out.commit(manifest, replace=force)
    except BaseException:
        stream.close()  # stops the pool
        out.abort()
        raise
    finally:
        progress.done()
    if shown < summary.skipped and not quiet:
        print(f"warning: {summary.skipped - shown} more malformed record(s) skipped; they are listed in "
              f"{out.final / 'prepare.json'}", file=sys.stderr)
    return summary


def default_workers(total_bytes: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, total_bytes // CHUNK_BYTES + 1))


def prepare(inputs: list[str], out_dir: str, bucket: str, tokenizer: str = "byte", workers: int = 0,
            strict: bool = False, quiet: bool = False, field_name: str = "text", force: bool = False,
            shard_tokens: int = SHARD_TOKENS, chunk_bytes: int = CHUNK_BYTES) -> Summary:
    files = input_files(inputs)
    if not files:
        raise PrepareError(f"no .txt, .jsonl or .jsonl.gz files in {', '.join(inputs)}")
    get_tokenizer(tokenizer)  # fail early, in this process, on a bad spec
    total = sum(f.stat().st_size for f in files)
    tasks = (task for f in files for task in file_tasks(f, chunk_bytes))
    return write_bucket(Path(out_dir), bucket, tokenizer, tasks, total_bytes=total,
                        workers=workers or default_workers(total), strict=strict, quiet=quiet,
                        field_name=field_name, force=force, shard_tokens=shard_tokens,
                        inputs=[str(p) for p in inputs])


# -- the embedded demo corpus: Python's standard library, as code, prose and comments --------------------------------
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
        if not force and any((Path(out_dir) / bucket).glob("*.idx")):
            if not quiet:
                print(f"bucket {bucket!r} -> {Path(out_dir) / bucket}: exists, kept (--force rebuilds it)")
            continue
        tasks = (Task(f"demo-{bucket}", str(f), size=f.stat().st_size) for f in files)
        out[bucket] = write_bucket(Path(out_dir), bucket, "byte", tasks, total_bytes=total,
                                   workers=workers or default_workers(total), quiet=quiet, force=force,
                                   inputs=[f"demo:{bucket} ({len(files)} stdlib modules of Python "
                                           f"{sys.version.split()[0]})"])
    return out


def ensure_demo(out_dir: str, buckets: Iterable[str] = DEMO_DEFAULT) -> None:
    """Build the demo buckets that are missing (a finished bucket is marked by its .idx files, written last).
    Safe when several processes race: each builds in its own hidden folder and the first rename wins."""
    root = Path(out_dir)
    missing = [b for b in buckets if not (root / b).is_dir() or not any((root / b).glob("*.idx"))]
    if missing:
        # In-process: cheap enough (a few seconds) and safe in a process that already runs torch threads.
        for bucket in missing:
            files = stdlib_sources()
            tasks = (Task(f"demo-{bucket}", str(f), size=f.stat().st_size) for f in files)
            try:
                write_bucket(root, bucket, "byte", tasks, workers=1, quiet=True,
                             inputs=[f"demo:{bucket} ({len(files)} stdlib modules of Python "
                                     f"{sys.version.split()[0]})"])
            except PrepareError:
                if not any((root / bucket).glob("*.idx")):
                    raise


class Progress:
    """One self-overwriting line on a terminal; elsewhere (logs) a plain line every 30 s."""

    def __init__(self, bucket: str, total_bytes: int, quiet: bool):
        self.bucket, self.total, self.start, self.last = bucket, total_bytes, time.time(), time.time()
        self.tty = sys.stderr.isatty()
        self.enabled, self.shown = not quiet, False

    def _text(self, s: Summary) -> str:
        elapsed = max(time.time() - self.start, 1e-9)
        pct = f"{100 * s.input_bytes / self.total:5.1f}% " if self.total else ""
        return (f"prepare {self.bucket}: {pct}{s.input_bytes / 1e6:,.0f} MB read, {s.documents:,} docs, "
                f"{s.tokens:,} tokens, {s.tokens / elapsed / 1e6:.2f}M tok/s, {s.skipped} skipped")

    def update(self, s: Summary) -> None:
        now = time.time()
        if not self.enabled or now - self.last < (0.2 if self.tty else 30.0):
            return
        self.last = now
        if self.tty:
            print("\r" + self._text(s) + "\x1b[K", end="", file=sys.stderr, flush=True)
            self.shown = True
        else:
            print(self._text(s), file=sys.stderr, flush=True)

    def clear(self) -> None:
        if self.shown:
            print("\r\x1b[K", end="", file=sys.stderr, flush=True)
            self.shown = False

    def done(self) -> None:
        self.clear()


# -- the command line ----------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise PrepareError(f"{message} (see gpt-simple prepare --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gpt-simple prepare", description=__doc__.split("\n\n")[0],
                epilog="Exit codes: 0 done (malformed records skipped are listed as warnings), 1 an I/O error, "
                       "2 bad arguments or input (with --strict: the first malformed record), 130 interrupted.")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help=".txt, .jsonl, .jsonl.gz files or folders of them")
    p.add_argument("--out", help="data folder (data.dir); the bucket goes to OUT/BUCKET")
    p.add_argument("--bucket", help="bucket name (a sub-folder of OUT)")
    p.add_argument("--tokenizer", default="byte", help="byte (default), tiktoken:NAME or hf:FILE.json")
    p.add_argument("--field", default="text", help="JSONL field holding the document text (default: text)")
    p.add_argument("--strict", action="store_true", help="stop at the first malformed record (default: skip it)")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (default: one per CPU)")
    p.add_argument("--force", action="store_true", help="replace the bucket if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress line and no per-record warnings")
    p.add_argument("--demo", metavar="OUT", help="build the embedded demo corpus (Python's stdlib) into OUT")
    p.add_argument("--buckets", default=",".join(DEMO_DEFAULT),
                   help=f"with --demo: which demo buckets (of {', '.join(DEMO_BUCKETS)}; default "
                        f"{','.join(DEMO_DEFAULT)})")
    return p


def prepare_main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.workers < 0:
            raise PrepareError("--workers must be >= 0")
        if args.demo:
            if args.inputs or args.out or args.bucket:
                raise PrepareError("--demo OUT builds the demo corpus; give no INPUT, --out or --bucket with it")
            buckets = [b.strip() for b in args.buckets.split(",") if b.strip()]
            for summary in prepare_demo(args.demo, buckets, args.workers, args.quiet, args.force).values():
                print(summary.line())
            return 0
        if not args.inputs or not args.out or not args.bucket:
            raise PrepareError("give INPUT... --out DIR --bucket NAME (or --demo DIR)")
        summary = prepare(args.inputs, args.out, args.bucket, args.tokenizer, args.workers, args.strict,
                          args.quiet, args.field, args.force)
        print(summary.line())
        return 0
    except (PrepareError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # tokenizer spec
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
