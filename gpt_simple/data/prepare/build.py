"""The pipeline: input files → tasks → worker pool → one bucket of shards, with problems reported on the way.

Each time a shard is finished the writer records where the next one starts (file, task, document) and every
count so far; a rerun after a kill continues from the last record, and its output is the same, byte for byte,
as that of an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable, Iterator

from gpt_simple.data.prepare.errors import Interrupted, PrepareError
from gpt_simple.data.prepare.folder import HOLDOUT_DIR
from gpt_simple.data.prepare.holdout import Holdout, write_split
from gpt_simple.data.prepare.pool import default_workers, results
from gpt_simple.data.prepare.report import Problems, Progress, Summary
from gpt_simple.data.prepare.sources import CHUNK_BYTES, Reading, check_inputs, file_tasks, format_list, input_files
from gpt_simple.data.prepare.tasks import Result, Task
from gpt_simple.data.prepare.writer import SHARD_TOKENS, BucketWriter
from gpt_simple.data.shards import dtype_for_vocab
from gpt_simple.data.tokenizer import get_tokenizer

PLAN_FORMAT = 1
_COUNTS = ("files", "documents", "tokens", "skipped", "blank_lines", "input_bytes", "problems")


class _File:
    """Bookkeeping across the current file's tasks: its records (a file of records without any is reported) and,
    for byte ranges whose worker numbered lines from 1, the lines before the current range."""

    def __init__(self, summary: Summary, no: int = -1, records: int = 0, lines_before: int = 0):
        self.summary, self.no, self.records, self.lines_before = summary, no, records, lines_before

    def problems(self, task: Task, result: Result) -> list[tuple]:
        if task.file_no != self.no:
            self.no, self.records, self.lines_before = task.file_no, 0, 0
            self.summary.files += 1
        self.records += len(result.docs) + len(result.problems)
        problems = list(result.problems)
        if task.relative_lines:
            problems = [(line + self.lines_before, category, detail) for line, category, detail in problems]
            self.lines_before += result.lines
        if task.last and task.records and self.records == 0:
            problems.append((None, "empty file", "empty file (no records, only blank lines)"))
        return problems


def _plan(bucket: str, tok, files: list[Path], strict: bool, shard_tokens: int, extra: dict) -> dict:
    """What the output depends on; a build is continued only under the same plan."""
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"format": PLAN_FORMAT, "bucket": bucket, "tokenizer": tok.id, "strict": strict,
            "shard_tokens": shard_tokens, **extra, "files": len(files), "files_sha256": digest.hexdigest()}


def _tasks(files: list[Path], cut: Callable[[Path], Iterable[Task]], start: tuple[int, int]) -> Iterator[Task]:
    """Every file's tasks, numbered, from position `start` on (the ones before it were written already)."""
    for file_no in range(start[0], len(files)):
        for task_no, task in enumerate(cut(files[file_no])):
            if (file_no, task_no) >= start:
                task.file_no, task.task_no = file_no, task_no
                yield task


def _snapshot(summary: Summary, problems: Problems, current: _File, position: list[int], seconds: float,
              out: BucketWriter, holdout: Holdout) -> dict:
    """The record taken as a shard is finished: the next document's position, everything counted before it, and
    the validation candidates so far (their tokens in a file of their own, named by the shard count)."""
    pending = f"pending-{out.shards:05d}"
    ordinals = holdout.save(out.tmp / HOLDOUT_DIR / pending, out.tok.vocab_size, out.tok.id, out.tok.eos)
    durable = (out.folder.progress or {}).get("holdout", [""])[0]   # named by the record in force
    for old in (out.tmp / HOLDOUT_DIR).glob("pending-*"):
        if old.name.split(".")[0] not in (pending, durable):
            old.unlink()
    return {**{name: getattr(summary, name) for name in _COUNTS}, "reasons": dict(problems.reasons),
            "shown": problems.shown, "seconds": seconds, "position": position,
            "file": [current.no, current.records, current.lines_before], "holdout": [pending, ordinals]}


def _restore(record: dict, summary: Summary, problems: Problems, out: BucketWriter, holdout: Holdout) -> _File:
    for name in _COUNTS:
        setattr(summary, name, record[name])
    problems.reasons.update(record["reasons"])  # in first-seen order, as an uninterrupted run has them
    problems.shown = record["shown"]
    pending, ordinals = record.get("holdout", ["", []])
    holdout.load(out.tmp / HOLDOUT_DIR / pending, ordinals)
    return _File(summary, *record["file"])


def write_bucket(out_dir: Path, bucket: str, tokenizer: str, files: list[Path],
                 cut: Callable[[Path], Iterable[Task]], *, plan: dict | None = None, total_bytes: int = 0,
                 workers: int = 1, strict: bool = False, quiet: bool = False, field_name: str = "text",
                 force: bool = False, shard_tokens: int = SHARD_TOKENS, inputs: list[str] | None = None,
                 val_docs: int = 0, val_seed: int = 0) -> Summary:
    """Tokenize the documents of `files` (each cut into tasks by `cut`) and write them, in order, as bucket
    out_dir/bucket; `val_docs` of them, chosen by holdout.py, go to its validation split instead. `plan`:
    whatever else the output depends on."""
    start = time.time()
    tok = get_tokenizer(tokenizer)
    split = {"val_docs": val_docs, "val_seed": val_seed} if val_docs else {}
    out = BucketWriter(Path(out_dir), bucket, tok, _plan(bucket, tok, files, strict, shard_tokens,
                                                        {"field": field_name, **split, **(plan or {})}),
                       shard_tokens, force)
    holdout = Holdout(val_docs, val_seed)
    summary = Summary(bucket=bucket, folder=str(out.final), tokenizer=tok.id, vocab_size=tok.vocab_size,
                      dtype=dtype_for_vocab(tok.vocab_size))
    progress = Progress(bucket, total_bytes, quiet)
    problems = Problems(summary, progress, strict, quiet)
    current, resume, earlier = _File(summary), None, 0.0
    if out.resumed:
        current = _restore(out.resumed, summary, problems, out, holdout)
        resume, earlier = out.resumed["position"], out.resumed["seconds"]
        progress.base_tokens = summary.tokens
        if not quiet:
            print(f"prepare {bucket}: continuing the build in {out.tmp}: {out.shards} finished shard(s) kept, "
                  f"from {files[resume[0]]}", file=sys.stderr, flush=True)
    stream = results(_tasks(files, cut, tuple(resume[:2]) if resume else (0, 0)), tokenizer, field_name, workers)
    try:
        for task, result in stream:
            first = 0
            if resume and [task.file_no, task.task_no] == resume[:2]:
                first = resume[2]   # the record was taken inside this task: its problems were counted
            else:
                for line, category, detail in current.problems(task, result):
                    problems.add(task.where(line), category, detail)
            for doc in range(first, len(result.docs)):
                if out.full():
                    out.finish_shard(_snapshot(summary, problems, current, [task.file_no, task.task_no, doc],
                                               earlier + time.time() - start, out, holdout))
                tokens = holdout.offer(summary.documents + len(holdout), result.docs[doc])
                if tokens is not None:
                    out.add(tokens)
                    summary.documents += 1
                    summary.tokens += len(tokens)
            summary.blank_lines += result.blank
            summary.input_bytes += task.size
            progress.update(summary)
        if summary.documents == 0:
            held = f"; all {len(holdout)} went to the validation split (--val-docs)" if len(holdout) else ""
            raise PrepareError(f"{out.final}: no documents to write ({summary.skipped} malformed record(s) "
                               f"skipped, see the warnings above{held})")
        if len(holdout):
            summary.val_documents = len(holdout)
            summary.val_tokens = write_split(out.tmp, holdout.chosen(), tok.vocab_size, tok.id, tok.eos)
        summary.shards = out.shards
        summary.skipped_by_reason = dict(problems.reasons)
        summary.seconds = earlier + time.time() - start
        manifest = {"bucket": bucket, "tokenizer": tok.id, "vocab_size": tok.vocab_size, "eos": tok.eos,
                    "inputs": inputs or [], "created_at": time.time(), **asdict(summary)}
        out.commit(manifest, replace=force)
    except KeyboardInterrupt:
        stream.close()  # stops the pool
        raise Interrupted(out.suspend()) from None
    except BaseException:
        stream.close()
        out.abort()
        raise
    finally:
        progress.done()
    problems.close(out.final / "prepare.json")
    return summary


def prepare(inputs: list[str], out_dir: str, bucket: str, tokenizer: str = "byte", workers: int = 0,
            strict: bool = False, quiet: bool = False, field_name: str = "text", force: bool = False,
            shard_tokens: int = SHARD_TOKENS, chunk_bytes: int = CHUNK_BYTES, text_column: str = "text",
            val_docs: int = 0, val_seed: int = 0) -> Summary:
    """Tokenize the documents of `inputs` (files or folders) into the bucket out_dir/bucket."""
    files = input_files(inputs)
    if not files:
        raise PrepareError(f"no {format_list()} files in {', '.join(inputs)}")
    get_tokenizer(tokenizer)  # fail early, in this process, on a bad spec
    how = Reading(chunk_bytes, text_column)
    check_inputs(files, how)
    total = sum(f.stat().st_size for f in files)
    return write_bucket(Path(out_dir), bucket, tokenizer, files, lambda f: file_tasks(f, how),
                        plan={"chunk_bytes": chunk_bytes, "text_column": text_column}, total_bytes=total,
                        workers=workers or default_workers(total), strict=strict, quiet=quiet,
                        field_name=field_name, force=force, shard_tokens=shard_tokens,
                        inputs=[str(p) for p in inputs], val_docs=val_docs, val_seed=val_seed)
