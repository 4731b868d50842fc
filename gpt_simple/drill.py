"""The one test seam: a drill slows chosen parts of a run (steps, evaluations, checkpoint writes and staging) so
that a test or a fire drill can stop or kill a job at a known moment, whatever the machine's speed.

It is switched on by one setting, the environment variable GPT_SIMPLE_DRILL (unset in production), e.g.
`GPT_SIMPLE_DRILL="step=0.2,save=2"`: each named part takes at least that many more seconds. The launch reads
it once (`Drill.from_environ`), refuses a malformed value with one line before anything is built, announces an
active drill in the log and in events.jsonl, and hands the object to the components that pause for it. No
production module reads the environment for a test knob; they call `drill.pause(part)`.

Import-light (no torch): the launch parses it before set-up.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

ENV = "GPT_SIMPLE_DRILL"
# part: what pauses for it
PARTS = {
    "step": "each training step takes this much longer (so at least this long)",
    "eval": "each evaluation takes this much longer",
    "save": "each checkpoint write (every rank) starts this much later: a slow filesystem",
    "stage": "each async save's staging copy starts this much later: a slow device-to-host copy",
}


class DrillError(ValueError):
    """GPT_SIMPLE_DRILL is malformed: one line naming it and what is wrong."""


@dataclass(frozen=True)
class Drill:
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "Drill":
        seconds: dict[str, float] = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            part, sep, value = item.partition("=")
            part = part.strip()
            if part not in PARTS or not sep:
                raise DrillError(f"{ENV}={text!r}: {item!r} is not PART=SECONDS with PART one of "
                                 f"{', '.join(PARTS)}")
            try:
                number = float(value)
                if not 0 <= number < float("inf"):
                    raise ValueError
            except ValueError:
                raise DrillError(f"{ENV}={text!r}: {part} needs a number of seconds >= 0, not "
                                 f"{value.strip()!r}") from None
            seconds[part] = number
        return cls(seconds)

    @classmethod
    def from_environ(cls, environ=os.environ) -> "Drill":
        return cls.parse(environ.get(ENV, ""))

    @property
    def active(self) -> bool:
        return any(v > 0 for v in self.seconds.values())

    def get(self, part: str) -> float:
        assert part in PARTS, part
        return self.seconds.get(part, 0.0)

    def pause(self, part: str) -> None:
        seconds = self.get(part)
        if seconds > 0:
            time.sleep(seconds)

    def describe(self) -> str:
        return ", ".join(f"{p} +{s:g}s" for p, s in self.seconds.items() if s > 0)


NO_DRILL = Drill()
