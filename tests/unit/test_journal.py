"""The journal: the one writer of a run's records (run_state.json, events.jsonl, metric sinks, HALTED, config.toml,
audit); silent off rank 0 by construction; every sink shows a step once after a replay. In process."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gpt_simple.clock import Clock
from gpt_simple.config import Config
from gpt_simple.journal import WRITES, Journal, SilentJournal, events, open_journal
from gpt_simple.run_dir import read_jsonl
from gpt_simple.shutdown import Deadline

PACKAGE = Path(__file__).resolve().parents[2] / "gpt_simple"


def cfg_for(out: Path, tensorboard: bool = False, audit: bool = False) -> Config:
    cfg = Config()
    cfg.training.output_dir, cfg.training.tensorboard, cfg.data.audit = str(out), tensorboard, audit
    cfg.training.max_steps = 10
    return cfg


def step_record(step: int, loss: float = 1.0) -> dict:
    return {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 0.5, "tokens": step * 8, "tokens_per_s": 100.0,
            "mfu": None, "data_wait_frac": 0.0}


def test_events_are_typed_records_of_the_catalogue(tmp_path):
    j = Journal(tmp_path)
    j.event(events.SaveBudget(reserve_s=1.0, budget_s=3.0, measured_s=2.0))
    j.event(events.SaveBudget(reserve_s=1.0, budget_s=3.0, measured_s=2.0, carried=True))
    j.event(events.Save(checkpoint="step-2", step=2, type="periodic", asynchronous=True, blocking_s=0.1,
                        total_s=0.5, bytes=None))
    with pytest.raises(TypeError):
        j.event("save")  # a free string is not an event
    lines = read_jsonl(tmp_path / "events.jsonl")
    assert [line["event"] for line in lines] == ["save_budget", "save_budget", "save"]
    assert "carried" not in lines[0] and lines[1]["carried"] is True  # optional fields only when set
    assert lines[2]["async"] is True and lines[2]["bytes"] is None and "asynchronous" not in lines[2]
    assert all(line["launch"] == 1 and line["time"] > 0 for line in lines)


def test_no_event_name_is_spelled_outside_the_catalogue():
    kinds = set(events.CATALOGUE)
    assert len(kinds) == len(events.Event.__subclasses__())  # one class per kind
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "journal":
            continue
        text = path.read_text()
        offenders += [f"{path.name}: {m.group(0)}" for m in re.finditer(r"""\.event\(\s*["']""", text)]
        offenders += [f"{path.name}: {m.group(0)}" for m in re.finditer(r"""["']event["']\)?\s*(==|\bin\b)""", text)]
    assert not offenders, offenders


def test_status_writes_carry_the_clocks_durations(tmp_path):
    j = Journal(tmp_path)
    clock = Clock(Deadline(None, "none", []), 1.0)
    j.follow(clock)
    clock.record("step", 0.25)
    clock.record_save(3.0, asynchronous=False)
    j.heartbeat(step=4, tokens=32)
    state = json.loads((tmp_path / "run_state.json").read_text())
    assert state["step"] == 4 and state["durations"] == {"save_sync_s": 3.0, "step_s": 0.25}
    assert state["stale_after_s"] == clock.stale_after_s()
    assert Journal(tmp_path).durations == {"save_sync_s": 3.0, "step_s": 0.25}  # the next launch reads them


def test_a_state_from_before_the_clock_carries_its_save_times(tmp_path):
    (tmp_path / "run_state.json").write_text(json.dumps({"status": "STOPPED", "step": 3,
                                                         "save_s": {"sync": 2.5, "async": 0.0}}))
    assert Journal(tmp_path).durations == {"save_sync_s": 2.5}


def test_the_other_ranks_journal_writes_nothing(tmp_path):
    silent = open_journal(tmp_path, is_main=False)
    assert isinstance(silent, SilentJournal) and isinstance(open_journal(tmp_path, True), Journal)
    cfg = cfg_for(tmp_path, tensorboard=True, audit=True)
    calls = {"status": dict(status="RUNNING"), "heartbeat": dict(step=1, tokens=8),
             "event": dict(record=events.HaltOverridden(step=1)), "begin": dict(cfg=cfg, config_toml="x", resume_step=0),
             "audit": dict(step=1, spans=[]), "halted": dict(detail={}), "not_halted": {},
             "step": dict(record=step_record(1)), "evaluation": dict(record={}, seconds=1.0),
             "commit": dict(save=None), "end": dict(ending=events.Stop(reason="signal SIGTERM", step=1)),
             "close": {}, "follow": dict(clock=None), "drop_torn_lines": {}}
    assert set(calls) == set(WRITES)
    for name, kwargs in calls.items():
        getattr(silent, name)(**kwargs)
    assert list(tmp_path.iterdir()) == []


def test_begin_writes_the_config_and_trims_replayed_records(tmp_path):
    j = Journal(tmp_path)
    j.begin(cfg_for(tmp_path, audit=True), "# config\n", resume_step=0)
    for step in range(1, 6):
        j.audit(step, [["code", step, 0, 9]])
        j.step(step_record(step))
    j.close()
    j2 = Journal(tmp_path)  # resumed from a checkpoint at step 3: steps 4 and 5 are trained again
    j2.begin(cfg_for(tmp_path, audit=True), "# config 2\n", resume_step=3)
    assert (tmp_path / "config.toml").read_text() == "# config 2\n"
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert [r["step"] for r in read_jsonl(tmp_path / "data_audit.jsonl")] == [1, 2, 3]


def test_halted_marker_and_its_override(tmp_path):
    j = Journal(tmp_path)
    j.halted({"bucket": "code", "reason": "ran dry"})
    assert json.loads((tmp_path / "HALTED").read_text())["bucket"] == "code"
    cfg = cfg_for(tmp_path)
    cfg.data.allow_bucket_exhaustion = True
    j.begin(cfg, "", resume_step=7)
    assert not (tmp_path / "HALTED").exists()
    assert [e["event"] for e in read_jsonl(tmp_path / "events.jsonl")] == ["halt_overridden"]


def tensorboard_steps(folder: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_shows_each_step_once_after_replays(tmp_path):
    """A launch killed before its first checkpoint logged steps 1-4; the next one starts again at step 0 and is
    killed at step 6 after a checkpoint at 3; the last resumes from 3. TensorBoard's own reader shows each step
    once, with the last launch's values."""
    for resume_step, steps, loss in ((0, range(1, 5), 9.0), (0, range(1, 7), 8.0), (3, range(4, 9), 7.0)):
        j = Journal(tmp_path)
        j.begin(cfg_for(tmp_path, tensorboard=True), "", resume_step=resume_step)
        for step in steps:
            j.step(step_record(step, loss))
        j.close()
    assert tensorboard_steps(tmp_path / "tensorboard", "train/loss") == \
        [(1, 8.0), (2, 8.0), (3, 8.0), (4, 7.0), (5, 7.0), (6, 7.0), (7, 7.0), (8, 7.0)]
    assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == \
        [(1, 8.0), (2, 8.0), (3, 8.0), (4, 7.0), (5, 7.0), (6, 7.0), (7, 7.0), (8, 7.0)]
