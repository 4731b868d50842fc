"""Graceful shutdown: the deadline, the signal flags, the stop file, and the per-step stop votes.

Import-light on purpose (no torch): train.py installs the handlers and starts the clock first thing in the
process, so a relative budget counts from process start and a signal during set-up is not lost.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from gpt_simple.run_dir import RunDir

PROCESS_START = time.time()
GRACEFUL_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")


@dataclass
class Deadline:
    at: float | None      # epoch seconds, or None
    source: str           # 'training.max_runtime_seconds', 'SLURM_JOB_END_TIME', 'GPT_SIMPLE_MAX_RUNTIME', 'none'
    warnings: list[str]

    def seconds_left(self, now: float | None = None) -> float | None:
        return None if self.at is None else self.at - (time.time() if now is None else now)


def resolve_deadline(max_runtime_seconds: float, environ=os.environ, start: float = PROCESS_START) -> Deadline:
    """First that applies: the config's budget, SLURM_JOB_END_TIME, GPT_SIMPLE_MAX_RUNTIME, none.

    An unparsable value is reported with its source and the next source is used.
    """
    warnings = []
    if max_runtime_seconds > 0:
        return Deadline(start + max_runtime_seconds, "training.max_runtime_seconds", warnings)
    for name, absolute in (("SLURM_JOB_END_TIME", True), ("GPT_SIMPLE_MAX_RUNTIME", False)):
        raw = environ.get(name, "").strip()
        if not raw:
            continue
        try:
            value = float(raw)
            if not value > 0 or value != value or value == float("inf"):
                raise ValueError
        except ValueError:
            warnings.append(f"ignoring {name}={raw!r}: not a positive number of seconds")
            continue
        return Deadline(value if absolute else start + value, name, warnings)
    return Deadline(None, "none", warnings)


class StopFlags:
    """Set by signal handlers (which do nothing else); read once per step by the trainer."""

    def __init__(self):
        self.signal_name: str | None = None
        self._interrupts = 0

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT":
            self._interrupts += 1
            if self._interrupts > 1:
                # A second Ctrl-C means "now": skip the final save.
                os._exit(130)
        if self.signal_name is None:
            self.signal_name = name

    def install(self) -> None:
        for name in GRACEFUL_SIGNALS:
            signal.signal(getattr(signal, name), self._handle)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


FLAGS = StopFlags()


def install() -> None:
    """Call first thing in the process (train.py does, before importing torch)."""
    FLAGS.install()


def request_stop(output_dir: str | Path) -> Path:
    """`gpt-simple stop OUTDIR`: ask a running job to save and exit at its next step."""
    path = RunDir(output_dir).stop
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"stop requested at {time.time():.0f} by pid {os.getpid()}\n")
    return path


@dataclass
class StopVotes:
    """One rank's view at a step boundary; agreed over ranks (any rank's yes is everyone's) in one all-reduce
    by gpt_simple.runtime.agree, so every rank stops, or commits a finished async save, at the same step."""
    signal: int = 0  # the number of the stop signal this rank received (0: none); agreed, the highest
    deadline: bool = False
    stop_file: bool = False
    save_in_flight: bool = False  # this rank's async checkpoint write is still running

    def reason(self, deadline: Deadline) -> str | None:
        """The same words on every rank, whichever rank the signal reached first."""
        if self.signal:
            return f"signal {signal.Signals(int(self.signal)).name}"
        if self.deadline:
            return f"deadline ({deadline.source})"
        if self.stop_file:
            return "stop file"
        return None


class StopPolicy:
    """This rank's votes for the per-step agreement, and why the agreed votes say to stop. Whether the deadline
    is near is the clock's arithmetic (gpt_simple/clock.py); this adds the signal flags and the stop file."""

    def __init__(self, output_dir: Path, deadline: Deadline, flags: StopFlags = FLAGS):
        self.stop_file = RunDir(output_dir).stop
        self.deadline, self.flags = deadline, flags

    def votes(self, near_deadline: bool, save_in_flight: bool = False) -> StopVotes:
        number = getattr(signal, self.flags.signal_name) if self.flags.signal_name else 0
        return StopVotes(int(number), near_deadline, self.stop_file.exists(), save_in_flight)

    def reason(self, agreed: StopVotes) -> str | None:
        return agreed.reason(self.deadline)

    def clear_stop_file(self) -> None:
        self.stop_file.unlink(missing_ok=True)


def describe(deadline: Deadline) -> str:
    if deadline.at is None:
        return "deadline: none"
    return f"deadline: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(deadline.at))} " \
           f"({deadline.seconds_left():.0f}s left, from {deadline.source})"
