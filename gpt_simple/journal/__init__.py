"""The journal: everything a run writes about itself, in one place.

run_state.json (the status the orchestrator reads, with the clock's durations), events.jsonl (typed records of
the catalogue in journal/events.py), the metric sinks (metrics.jsonl, TensorBoard, W&B, the console: the same
step and evaluation records), the HALTED marker, config.toml and the data audit. The trainer and the launch hand
it records and know no file.

Only rank 0 keeps a journal. Every other rank gets a `SilentJournal`, whose writing methods are built to do
nothing, so no caller checks its rank before recording.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from gpt_simple.journal import events
from gpt_simple.journal.events import Event
from gpt_simple.run_dir import (RunDir, append_jsonl, drop_torn_line, truncate_jsonl, write_atomic,
                                write_json_atomic)
from gpt_simple.run_state import RunState


class Journal:
    def __init__(self, output_dir: str | Path):
        self.run_dir = RunDir(output_dir)
        self.state = RunState(self.run_dir.path)
        self.sinks: list = []
        self.console = None  # journal.sinks.ConsoleSink, from begin()
        self.clock = None  # the run's Clock, once built: every status write carries its durations
        self.audit_on = False

    # -- what the launch knows before training ----------------------------------------------------------------
    @property
    def previous_step(self) -> int:
        return self.state.previous_step

    @property
    def idle_launches(self) -> int:
        """Launches in a row, before this one, that reached their deadline without training a step."""
        return int(self.state.state.get("idle_launches") or 0)

    @property
    def previous_seen_at(self) -> float | None:
        return self.state.previous_seen_at

    @property
    def lease(self):
        return self.state.lease

    @lease.setter
    def lease(self, lease) -> None:
        self.state.lease = lease

    @property
    def durations(self) -> dict:
        """The durations the previous launch measured (rank 0 only: other ranks learn them from the trainer's
        agreement)."""
        return dict(self.state.previous_durations)

    @property
    def launches(self) -> int:
        return self.state.state["launches"]

    def follow(self, clock) -> None:
        self.clock = clock

    # -- run_state.json ----------------------------------------------------------------------------------------
    def status(self, **fields) -> None:
        if self.clock is not None:
            fields.update(durations=self.clock.carried(), stale_after_s=self.clock.stale_after_s())
        self.state.update(**fields)

    def heartbeat(self, step: int, tokens: int) -> None:
        self.status(step=step, tokens=tokens)

    # -- events.jsonl ------------------------------------------------------------------------------------------
    def event(self, record: Event) -> None:
        if not isinstance(record, Event):
            raise TypeError(f"events.jsonl takes a record of gpt_simple.journal.events, not {record!r}")
        append_jsonl(self.run_dir.events, {"time": time.time(), "event": record.kind, "launch": self.launches,
                                           **record.fields()})

    # -- the launch's own files ----------------------------------------------------------------------------------
    def drop_torn_lines(self) -> None:
        """Before this launch appends to the run's logs: a last line a kill tore is dropped, said and recorded (the
        next record would otherwise be glued to it); a bad line anywhere else stops the launch (RecordsError)."""
        for path in (self.run_dir.events, self.run_dir.metrics, self.run_dir.audit):
            torn = drop_torn_line(path)
            if torn is not None:
                line, text = torn
                logging.getLogger("gpt_simple").warning(f"{path}: dropped its last line ({line}), torn by a kill: {text[:80]!r}")
                self.event(events.TornLineDropped(file=path.name, line=line, text=text[:200]))

    def begin(self, cfg, config_toml: str, resume_step: int) -> None:
        """Before the first step: config.toml of this launch, a HALTED marker the config now overrides, the
        audit and the metric sinks trimmed to the resumed step and opened."""
        write_atomic(self.run_dir.config, config_toml)
        if cfg.data.allow_bucket_exhaustion and self.run_dir.halted.exists():
            self.run_dir.halted.unlink()
            self.event(events.HaltOverridden(step=resume_step))
        self.audit_on = cfg.data.audit
        if self.audit_on:
            truncate_jsonl(self.run_dir.audit, resume_step)
        from gpt_simple.journal.sinks import ConsoleSink, metric_sinks  # torch: not for status.py and report
        self.console = ConsoleSink(cfg.training.max_steps)
        self.sinks = metric_sinks(cfg, self.run_dir)
        logged_past = [sink.open(resume_step) or 0 for sink in [*self.sinks, self.console]]
        self._replayed(resume_step, max(self.previous_step, *logged_past))

    def _replayed(self, resume_step: int, reached: int) -> None:
        """An earlier launch trained up to `reached` (its last status, or the last step it logged) and its
        newest committed checkpoint is `resume_step`: the steps between are trained again (lost work)."""
        if reached > resume_step:
            step_s = float(self.durations.get("step_s") or 0)
            self.event(events.Replay(from_step=resume_step, to_step=reached, steps=reached - resume_step,
                                     seconds=(reached - resume_step) * step_s))

    def audit(self, step: int, spans: list, plan: int = 0) -> None:
        """plan: the data plan's number (written from the first amendment on; no field means plan 0)."""
        if self.audit_on:
            append_jsonl(self.run_dir.audit, {"step": step, "spans": spans, **({"plan": plan} if plan else {})})

    def halted(self, detail: dict) -> None:
        write_json_atomic(self.run_dir.halted, detail)

    def not_halted(self) -> None:
        """A launch that ended otherwise (e.g. max_steps lowered to the halted step) is no longer HALTED."""
        self.run_dir.halted.unlink(missing_ok=True)

    # -- metric records --------------------------------------------------------------------------------------------
    def step(self, record: dict) -> None:
        for sink in self.sinks:
            sink.train(record)
        self.console.train(record)

    def evaluation(self, record: dict, seconds: float) -> None:
        for sink in self.sinks:
            sink.eval(record)
        self.console.eval(record, seconds)
        self.status(eval={k: record[k] for k in ("step", "loss", "ppl", "loss_by_bucket")})

    def commit(self, save: events.Save) -> None:
        """A committed checkpoint: its event, the status's last checkpoint, its timings as scalars."""
        self.event(save)
        for name in ("blocking_s", "total_s"):
            for sink in self.sinks:
                sink.scalar(f"checkpoint/{name}", getattr(save, name), save.step)
        self.status(last_checkpoint=save.checkpoint)

    def end(self, ending: Event) -> None:
        """How the launch ended (complete, stop, halt, error, transient failure), the last event of its launch,
        after its ledger: where its time went, from the clock (none before the clock was followed)."""
        if self.clock is not None:
            self.event(events.Ledger(**self.clock.ledger()))
        self.event(ending)

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()


# Every public method of a journal (what it writes): the SilentJournal of the other ranks does none of it. Derived,
# so that a method added to Journal is silent off rank 0 without a second list to keep.
WRITES = tuple(name for name, value in vars(Journal).items() if callable(value) and not name.startswith("_"))


def _nothing(self, *args, **kwargs) -> None:
    return None


class SilentJournal(Journal):
    """The journal of a rank other than 0: it reads nothing and writes nothing."""

    def __init__(self, output_dir: str | Path):
        self.run_dir = RunDir(output_dir)
        self.state = RunState(self.run_dir.path, enabled=False)
        self.sinks, self.console, self.clock, self.audit_on = [], None, None, False


for _name in WRITES:
    setattr(SilentJournal, _name, _nothing)


def open_journal(output_dir: str | Path, is_main: bool) -> Journal:
    return Journal(output_dir) if is_main else SilentJournal(output_dir)
