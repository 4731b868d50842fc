"""The clock: measured durations, their carry-over across launches, the stop arithmetic; and the drill seam that
slows what it measures. In process, no subprocesses."""
from __future__ import annotations

import time

import pytest

from gpt_simple.clock import SAVE_MARGIN, Clock
from gpt_simple.drill import Drill, DrillError
from gpt_simple.run_state import MIN_STALE_S
from gpt_simple.shutdown import Deadline, StopFlags, StopPolicy, StopVotes


def policy(tmp_path, reserve: float, left: float = 100.0) -> Clock:
    return Clock(Deadline(1000.0 + left, "test", []), reserve)


def test_the_budget_is_the_larger_of_the_reserve_and_the_measured_save(tmp_path):
    p = policy(tmp_path, reserve=5)
    assert p.reserve_seconds() == 5
    assert p.record_save(2.0, asynchronous=False) is None  # 3 s with the margin: the reserve stays
    warning = p.record_save(10.0, asynchronous=False)
    assert warning and "walltime_reserve_seconds = 5" in warning
    assert p.reserve_seconds() == SAVE_MARGIN * 10
    assert p.record_save(20.0, asynchronous=False) is None  # warned once
    # votes: stop once the deadline is within the budget plus a step
    assert not p.near_deadline(1.0, now=1000.0 + 100 - SAVE_MARGIN * 20 - 1.5)
    assert p.near_deadline(1.0, now=1000.0 + 100 - SAVE_MARGIN * 20 - 0.5)


def test_an_async_save_in_flight_adds_what_it_still_needs(tmp_path):
    p = policy(tmp_path, reserve=1)
    p.record_save(4.0, asynchronous=True)  # no sync save measured yet: the async total stands in
    assert p.reserve_seconds() == SAVE_MARGIN * 4
    p.save_started(asynchronous=True, now=500.0)
    assert p.reserve_seconds(save_in_flight=True, now=501.0) == SAVE_MARGIN * 4 + SAVE_MARGIN * 4 - 1.0
    assert p.reserve_seconds(save_in_flight=True, now=600.0) == SAVE_MARGIN * 4  # overdue: nothing extra
    assert p.reserve_seconds(save_in_flight=False, now=501.0) == SAVE_MARGIN * 4
    p.record_save(2.0, asynchronous=False)  # a synchronous save measured: it is what the shutdown save costs
    assert p.save_budget() == SAVE_MARGIN * 2


def test_no_deadline_no_warning(tmp_path):
    p = Clock(Deadline(None, "none", []), 1.0)
    assert p.record_save(100.0, asynchronous=False) is None
    assert not p.near_deadline(1.0)


def test_a_resumed_launch_starts_with_the_previous_launchs_measurement(tmp_path):
    p = policy(tmp_path, reserve=1)
    warning = p.carry_over({"save_sync_s": 4.0, "save_async_s": 6.0})  # run_state.json's durations before
    assert warning and "previous launch measured a save of 4.0s" in warning
    assert p.save_budget() == SAVE_MARGIN * 4  # from the first step, before this launch has saved
    assert p.record_save(2.0, asynchronous=False) is None  # said once per launch
    assert p.save_budget() == max(1, SAVE_MARGIN * 2)  # this launch's own measurement replaces it
    assert p.carried() == {"save_async_s": 6.0, "save_sync_s": 2.0}
    assert policy(tmp_path, reserve=10).carry_over({"save_sync_s": 4.0}) is None  # within the reserve: nothing
    fresh = policy(tmp_path, reserve=1)
    assert fresh.carry_over({}) is None and fresh.save_budget() == 1  # nothing measured before


def test_a_due_evaluation_is_budgeted_with_its_last_duration_or_an_estimate():
    clock = Clock(Deadline(1000.0, "test", []), 1.0)
    clock.record("step", 0.5)
    # before any evaluation: half a step per step's worth of tokens
    assert clock.expected_eval_seconds(eval_tokens=4000, tokens_per_step=1000) == pytest.approx(0.5 * 4 / 2)
    clock.carry_over({"eval_s": 7.0})  # the previous launch's evaluation
    assert clock.expected_eval_seconds(4000, 1000) == 7.0
    clock.record("eval", 3.0)  # this launch's own
    assert clock.expected_eval_seconds(4000, 1000) == 3.0
    # the evaluation counts in the vote: 1 s reserve + 0.5 s step + 3 s evaluation
    assert clock.near_deadline(0.5 + 3.0, now=1000.0 - 4.4)
    assert not clock.near_deadline(0.5, now=1000.0 - 4.4)


def test_staleness_grows_with_measured_steps_and_saves():
    clock = Clock(Deadline(None, "none", []), 1.0)
    assert clock.stale_after_s() == MIN_STALE_S
    clock.record("step", 30.0)
    clock.record_save(100.0, asynchronous=True)
    assert clock.stale_after_s() == 10 * 30.0 + 2 * 100.0


def test_the_drill_slows_what_the_clock_measures():
    clock = Clock(Deadline(None, "none", []), 1.0, drill=Drill.parse("step=0.2,eval=0.3"))
    clock.step_started()
    clock.step_ended()
    assert clock.step_seconds >= 0.2
    with clock.measure("eval"):
        pass
    assert clock.last["eval"] >= 0.3
    with clock.measure("load"):  # not a drilled kind
        pass
    assert clock.last["load"] < 0.2
    plain = Clock(Deadline(None, "none", []), 1.0)
    start = time.perf_counter()
    plain.step_started()
    plain.step_ended()
    assert plain.step_seconds < 0.2 and time.perf_counter() - start < 0.2


@pytest.mark.parametrize("text, wrong", [("step=abc", "step needs a number"), ("nap=1", "'nap=1' is not"),
                                         ("step", "'step' is not"), ("eval=-1", "eval needs a number"),
                                         ("save=inf", "save needs a number")])
def test_a_malformed_drill_is_one_line_naming_the_setting(text, wrong):
    with pytest.raises(DrillError) as e:
        Drill.parse(text)
    assert "GPT_SIMPLE_DRILL" in str(e.value) and wrong in str(e.value) and "\n" not in str(e.value)


def test_no_drill_in_production():
    assert not Drill.from_environ({}).active
    drill = Drill.from_environ({"GPT_SIMPLE_DRILL": "save=2, stage=0.5"})
    assert drill.active and drill.get("save") == 2 and drill.get("stage") == 0.5 and drill.get("step") == 0
    assert drill.describe() == "save +2s, stage +0.5s"


def test_the_stop_policy_adds_signals_and_the_stop_file_to_the_clocks_vote(tmp_path):
    flags = StopFlags()
    stop = StopPolicy(tmp_path, Deadline(None, "none", []), flags)
    assert stop.votes(near_deadline=False) == StopVotes()
    assert stop.reason(stop.votes(near_deadline=True)) == "deadline (none)"
    (tmp_path / "STOP").write_text("x")
    assert stop.reason(stop.votes(False)) == "stop file"
    stop.clear_stop_file()
    assert not (tmp_path / "STOP").exists()
    flags.signal_name = "SIGTERM"
    assert stop.votes(False).signal == 15
    assert stop.reason(stop.votes(True)) == "signal SIGTERM"  # a signal names itself first
    # agreed over ranks: a rank whose own flag is not set yet names the signal another rank received
    other = StopPolicy(tmp_path, Deadline(None, "none", []), StopFlags())
    assert other.reason(StopVotes(signal=15)) == "signal SIGTERM"


def test_only_the_drill_reads_a_test_knob():
    """Production modules read the environment for production settings only (a deadline, the shared index
    folder, the process group); the one test knob is GPT_SIMPLE_DRILL, read by gpt_simple/drill.py alone."""
    import re
    from pathlib import Path
    package = Path(__file__).resolve().parents[2] / "gpt_simple"
    production = {"GPT_SIMPLE_MAX_RUNTIME", "GPT_SIMPLE_INDEX_DIR"}
    for path in package.rglob("*.py"):
        names = set(re.findall(r"GPT_SIMPLE_[A-Z_]+", path.read_text())) - production
        assert names <= ({"GPT_SIMPLE_DRILL"} if path.name == "drill.py" else set()), (path, names)


def test_set_up_phases_add_up_to_the_set_up_time():
    clock = Clock(Deadline(None, "none", []), 5, process_start=100.0)
    clock.mark("imports", now=103.0)
    clock.mark("process_group", now=103.5)
    clock.mark("model", now=105.0)
    clock.mark("model", now=105.5)  # a phase marked twice adds up
    assert clock.setup_done(now=106.0) == 6.0
    assert clock.phases == {"imports": 3.0, "process_group": 0.5, "model": 2.0, "other": 0.5}
    assert sum(clock.phases.values()) == clock.last["setup"]


def test_a_step_that_waited_for_a_save_counts_the_wait_once_in_the_ledger():
    """The optimizer step waits for an async save's staging copy: that wait is the save's blocking time (the ledger's
    saves), so training is charged the rest of the step; the step's whole duration still budgets the next."""
    clock = Clock(Deadline(None, "none", []), 0.0, process_start=time.time())
    clock.setup_done()
    clock.step_started()
    time.sleep(0.05)
    clock.waited_for_save(0.03)
    clock.step_ended()
    clock.record_save(0.5, asynchronous=True, blocking_seconds=0.03)
    ledger = clock.ledger()
    assert clock.step_seconds >= 0.05 and ledger["train_s"] == pytest.approx(clock.step_seconds - 0.03)
    assert ledger["save_s"] == pytest.approx(0.03)
    parts = ledger["setup_s"] + ledger["train_s"] + ledger["eval_s"] + ledger["save_s"] + ledger["other_s"]
    assert parts == pytest.approx(ledger["total_s"]) and ledger["other_s"] >= 0
