"""What the user sees of a run: the progress line, a warning per malformed record, and the closing summary."""
from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from gpt_simple.data.prepare.errors import PrepareError

SHOW_PROBLEMS = 50        # warnings printed one by one; the rest are counted (and listed in prepare.json)
KEEP_PROBLEMS = 10_000    # problems listed in prepare.json


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
    val_documents: int = 0   # the validation split (--val-docs), not counted in documents / tokens
    val_tokens: int = 0
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
        val = (f"; validation split {self.val_documents:,} documents, {self.val_tokens:,} tokens"
               if self.val_documents else "")
        return (f"bucket {self.bucket!r} -> {self.folder}: {self.documents:,} documents, {self.tokens:,} tokens "
                f"({self.dtype}, tokenizer {self.tokenizer}) in {self.shards} shard(s) from {self.files} file(s)"
                f"{val}; "
                f"{skipped}{blank}; {self.seconds:.1f}s, {self.tokens_per_second / 1e6:.2f}M tokens/s")


class Progress:
    """One self-overwriting line on a terminal; elsewhere (logs) a plain line every 30 s."""

    def __init__(self, bucket: str, total_bytes: int, quiet: bool):
        self.bucket, self.total, self.start, self.last = bucket, total_bytes, time.time(), time.time()
        self.tty = sys.stderr.isatty()
        self.enabled, self.shown = not quiet, False
        self.base_tokens = 0   # tokens a continued build had written before this run: not this run's speed

    def _text(self, s: Summary) -> str:
        elapsed = max(time.time() - self.start, 1e-9)
        pct = f"{100 * s.input_bytes / self.total:5.1f}% " if self.total else ""
        return (f"prepare {self.bucket}: {pct}{s.input_bytes / 1e6:,.0f} MB read, {s.documents:,} docs, "
                f"{s.tokens:,} tokens, {(s.tokens - self.base_tokens) / elapsed / 1e6:.2f}M tok/s, {s.skipped} skipped")

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


class Problems:
    """Malformed records: fatal with strict; otherwise counted by kind, listed (up to KEEP_PROBLEMS) and shown
    (up to SHOW_PROBLEMS), so that nothing is dropped silently and a bad corpus does not flood the terminal."""

    def __init__(self, summary: Summary, progress: Progress, strict: bool, quiet: bool):
        self.summary, self.progress, self.strict, self.quiet = summary, progress, strict, quiet
        self.reasons: Counter = Counter()
        self.shown = 0

    def add(self, where: str, category: str, detail: str) -> None:
        if self.strict:
            raise PrepareError(f"{where}: {detail} (--strict: stopped, nothing was written; "
                               f"leave out --strict to skip malformed records)")
        self.summary.skipped += 1
        self.reasons[category] += 1
        if len(self.summary.problems) < KEEP_PROBLEMS:
            self.summary.problems.append(f"{where}: {detail}")
        if self.shown < SHOW_PROBLEMS and not self.quiet:
            self.progress.clear()
            print(f"warning: skipped {where}: {detail}", file=sys.stderr, flush=True)
            self.shown += 1

    def close(self, manifest_path) -> None:
        if self.shown < self.summary.skipped and not self.quiet:
            print(f"warning: {self.summary.skipped - self.shown} more malformed record(s) skipped; they are "
                  f"listed in {manifest_path}", file=sys.stderr)
