"""The report's arithmetic on an events.jsonl written by hand: three launches, the middle one killed before its
ledger (estimated from its last write, charged with the steps the next one trained again), queue gaps between
them. (From a real SIGKILL chain: tests/e2e/test_checkpoint.py's test_kill_9_during_saves.)"""
import json

import pytest

from gpt_simple.journal import events
from gpt_simple.report import format_text, goodput_line, launches, summary


def line(t: float, kind: type, launch: int, **fields) -> str:
    return json.dumps({"time": t, "event": kind.kind, "launch": launch, **fields}) + "\n"


LEDGER = dict(eval_s=2.0, save_s=1.0, other_s=2.0)


@pytest.fixture
def run(tmp_path):
    (tmp_path / "run_state.json").write_text("{}")
    (tmp_path / "events.jsonl").write_text("".join([
        line(100.5, events.Launch, 1, started_at=100.0, world_size=1),
        line(105.0, events.Setup, 1, phases={"imports": 3.0, "model": 2.0}, setup_s=5.0),
        line(159.9, events.Complete, 1, reason="max_steps reached", step=100),
        line(160.0, events.Ledger, 1, total_s=60.0, setup_s=5.0, train_s=50.0, steps=100, **LEDGER),
        line(200.5, events.Launch, 2, started_at=200.0, previous_seen_at=160.0),
        line(204.0, events.Setup, 2, phases={}, setup_s=4.0),
        line(230.0, events.Save, 2, checkpoint="step-80", step=80),
        line(300.5, events.Launch, 3, started_at=300.0, previous_seen_at=250.0),
        line(303.0, events.Replay, 3, from_step=80, to_step=100, steps=20, seconds=10.0),
        line(304.0, events.Setup, 3, phases={}, setup_s=4.0),
        line(399.0, events.Stop, 3, reason="deadline (SLURM_JOB_END_TIME)", step=280),
        line(400.0, events.Ledger, 3, total_s=100.0, setup_s=4.0, train_s=91.0, steps=180, **LEDGER),
    ]))
    return tmp_path


def test_each_launch_its_time_lost_work_and_gap(run):
    rows = launches(run)
    assert [r["launch"] for r in rows] == [1, 2, 3]
    one, two, three = rows
    assert (one["total_s"], one["train_s"], one["estimated"], one["ending"]) == (60.0, 50.0, False, "completed")
    # killed: from its start to its last write (the next launch's previous_seen_at), set-up, the rest training
    assert (two["end"], two["total_s"], two["setup_s"], two["train_s"]) == (250.0, 50.0, 4.0, 46.0)
    assert two["estimated"] and two["steps"] is None and two["ending"] == "killed (no end recorded)"
    assert (two["lost_steps"], two["lost_s"]) == (20, 10.0)  # the replay recorded by launch 3
    assert three["ending"] == "stopped: deadline (SLURM_JOB_END_TIME)" and three["lost_s"] == 0
    assert [r["gap_before_s"] for r in rows] == [None, 40.0, 50.0]


def test_goodput_over_the_launches_and_over_the_calendar(run):
    s = summary(launches(run))
    useful = 50.0 + (46.0 - 10.0) + 91.0
    assert s["goodput"] == pytest.approx(useful / (60 + 50 + 100))
    assert s["calendar_goodput"] == pytest.approx(useful / (400 - 100))
    assert s["queue_s"] == 90.0 and s["estimated_launches"] == [2]
    assert goodput_line(run).startswith(f"{useful / 210:.3f} of 3 launch(es)")
    text = format_text(run, launches(run), s)
    assert [row.split()[0] for row in text.splitlines()[3:6]] == ["1", "2*", "3"]
    assert "* no ledger recorded (killed, " in text


def test_a_run_without_events_has_no_goodput_yet(tmp_path):
    (tmp_path / "run_state.json").write_text("{}")
    assert launches(tmp_path) == [] and goodput_line(tmp_path) is None
