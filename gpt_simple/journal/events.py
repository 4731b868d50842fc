"""The catalogue of events.jsonl: one typed record per kind of thing that happens to a run. No event name is
spelled anywhere else; readers (W&B's re-send, status, benchmarks, tests) compare with `Kind.kind`.

Each line of events.jsonl is {"time", "event": kind, "launch": n, **fields}. A field declared with
`optional()` is left out of the line while it is None (e.g. `carried` of a save budget that this launch
measured itself); every other field is always written, null included.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar


def optional(default=None):
    return field(default=default, metadata={"optional": True})


@dataclass
class Event:
    kind: ClassVar[str] = ""
    renamed: ClassVar[dict[str, str]] = {}  # Python name -> JSON key, where the key is a Python keyword

    def fields(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get("optional"):
                continue
            out[self.renamed.get(f.name, f.name)] = value
        return out


# -- a launch's life ------------------------------------------------------------------------------------------------
@dataclass
class Launch(Event):
    kind: ClassVar[str] = "launch"
    world_size: int
    mesh: list
    deadline_source: str
    deadline_at: float | None
    warnings: list
    started_at: float | None = optional()        # the process start (the clock's)
    previous_seen_at: float | None = optional()  # the previous launch's last write: the queue gap starts there


@dataclass
class Drill(Event):
    """A test drill slows parts of this launch (gpt_simple/drill.py): never in production."""
    kind: ClassVar[str] = "drill"
    seconds: dict


@dataclass
class LeaseTakeover(Event):
    kind: ClassVar[str] = "lease_takeover"
    previous: dict


@dataclass
class Resume(Event):
    kind: ClassVar[str] = "resume"
    checkpoint: str
    step: int
    config_changes: dict
    load_s: float


@dataclass
class InitFrom(Event):
    """The first launch of a run started its model from a Hugging Face folder (model.init_from): which, and the
    sha256 of its weights (one file's digest, or of sha256sum's lines for sharded weights; `files` per file)."""
    kind: ClassVar[str] = "init_from"
    path: str
    layout: str
    sha256: str
    files: dict
    tensors: int


@dataclass
class Replay(Event):
    """Steps an earlier launch trained past its last committed checkpoint (killed, or lost a node): this launch
    trains them again. `seconds` at the step time that launch measured."""
    kind: ClassVar[str] = "replay"
    from_step: int
    to_step: int
    steps: int
    seconds: float


@dataclass
class Ledger(Event):
    """Where this launch's time went, from its process start to its end (the clock's sums): set-up, training
    steps, evaluations, the blocking part of saves, and the rest (the stop, logging, waiting on other ranks)."""
    kind: ClassVar[str] = "ledger"
    total_s: float
    setup_s: float
    train_s: float
    steps: int
    eval_s: float
    save_s: float
    other_s: float


@dataclass
class Setup(Event):
    """Where this launch's set-up went, phase by phase (the clock's marks), up to its first step."""
    kind: ClassVar[str] = "setup"
    phases: dict
    setup_s: float


@dataclass
class HaltOverridden(Event):
    kind: ClassVar[str] = "halt_overridden"
    step: int


@dataclass
class BucketDropped(Event):
    kind: ClassVar[str] = "bucket_dropped"
    bucket: str
    phase: int
    step: int
    tokens_unused: int
    mix: dict


@dataclass
class PlanAmended(Event):
    """A resume under a changed data plan with data.amend (data/amend.py): in force from the step after `step`."""
    kind: ClassVar[str] = "plan_amended"
    number: int      # the plan's number from now on (1 for the first amendment)
    step: int        # the checkpoint's step: step + 1 is the first step read under the new plan
    changes: list    # one line per change
    old: dict        # {"phases": [...], "buckets": {name: {"shards", "documents", "tokens"}}}
    new: dict


# -- checkpoints ----------------------------------------------------------------------------------------------------
@dataclass
class PartialCheckpointRemoved(Event):
    kind: ClassVar[str] = "partial_checkpoint_removed"
    name: str


@dataclass
class CheckpointFallback(Event):
    kind: ClassVar[str] = "checkpoint_fallback"
    checkpoint: str
    error: str


@dataclass
class TornLineDropped(Event):
    """The last line of a run log, torn by a kill, dropped before this launch appended to the log."""
    kind: ClassVar[str] = "torn_line_dropped"
    file: str
    line: int
    text: str


@dataclass
class CollectiveTimeoutUnavailable(Event):
    """training.collective_timeout_seconds could not be applied: the groups keep the set-up bound."""
    kind: ClassVar[str] = "collective_timeout_unavailable"
    seconds: float
    kept_s: float
    why: str


@dataclass
class CheckpointUnchecked(Event):
    """A checkpoint loaded without verifying its files: it was written before checksums existed."""
    kind: ClassVar[str] = "checkpoint_unchecked"
    checkpoint: str
    reason: str


@dataclass
class QuarantineRemoved(Event):
    """Retention removed checkpoints moved aside as damaged: newer saves have committed the work they held."""
    kind: ClassVar[str] = "quarantine_removed"
    names: list


@dataclass
class Save(Event):
    """A committed checkpoint (the manager's commit record)."""
    kind: ClassVar[str] = "save"
    renamed: ClassVar[dict[str, str]] = {"asynchronous": "async"}
    checkpoint: str
    step: int
    type: str
    asynchronous: bool
    blocking_s: float
    total_s: float
    bytes: int | None
    # the digest chain (gpt_simple/checkpoint/chain.py); absent from saves that predate it
    digest: str | None = optional()
    previous_digest: str | None = optional()

    @classmethod
    def from_record(cls, record: dict) -> "Save":
        return cls(record["checkpoint"], record["step"], record["type"], record["async"], record["blocking_s"],
                   record["total_s"], record["bytes"], record.get("digest"), record.get("previous_digest"))


@dataclass
class SaveBudget(Event):
    """A measured save time overruled training.walltime_reserve_seconds."""
    kind: ClassVar[str] = "save_budget"
    reserve_s: float
    budget_s: float
    measured_s: float
    carried: bool | None = optional()  # measured by the launch before


@dataclass
class DiskSpace(Event):
    kind: ClassVar[str] = "disk_space"
    message: str


# -- how a launch ends ----------------------------------------------------------------------------------------------
@dataclass
class Complete(Event):
    kind: ClassVar[str] = "complete"
    reason: str
    step: int
    tokens: int


@dataclass
class Stop(Event):
    kind: ClassVar[str] = "stop"
    reason: str
    step: int
    tokens: int | None = optional()  # unknown to a stop during set-up


@dataclass
class Halt(Event):
    kind: ClassVar[str] = "halt"
    reason: str
    step: int
    tokens: int


@dataclass
class Error(Event):
    kind: ClassVar[str] = "error"
    message: str
    step: int
    transient: bool | None = optional()  # the cap of transient failures in a row was reached


@dataclass
class TransientFailure(Event):
    kind: ClassVar[str] = "transient_failure"
    message: str
    step: int
    count: int


CATALOGUE: dict[str, type[Event]] = {cls.kind: cls for cls in Event.__subclasses__()}
ENDINGS = (Complete.kind, Stop.kind, Halt.kind, Error.kind)  # the last event of a launch that ended on its own


def records_of(records: list[dict], *kinds: type[Event]) -> list[dict]:
    """The events.jsonl records (read back as dicts) of these kinds, in order."""
    names = {kind.kind for kind in kinds}
    return [r for r in records if isinstance(r, dict) and r.get("event") in names]
