"""The trainer's steps driven in this process (a one-rank group): what each step hands the journal, the stop
decision on the clock's arithmetic, the save commit as a step of its own, the drill. No subprocess."""
from __future__ import annotations

import json

import pytest

from gpt_simple.drill import Drill
from gpt_simple.run_dir import read_jsonl
from gpt_simple.shutdown import Deadline
from gpt_simple.trainer import End
from helpers.trainer import trainer_here


def test_a_short_run_records_each_step_once_and_completes(tmp_path, demo_data):
    out = tmp_path / "run"
    with trainer_here(out, demo_data, "--training.max_steps", "3", "--training.save_steps", "2",
                      "--training.async_save", "false") as trainer:
        assert trainer.run() == 0
        assert trainer.train.step == 3
    state = json.loads((out / "run_state.json").read_text())
    assert state["status"] == "COMPLETED" and state["step"] == 3 and state["last_checkpoint"] == "step-3-final"
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    kinds = [e["event"] for e in read_jsonl(out / "events.jsonl")]
    assert kinds == ["launch", "setup", "save", "save", "ledger", "complete"]
    assert set(state["durations"]) >= {"setup_s", "step_s", "save_sync_s"}  # the clock's, carried
    (setup,) = [e for e in read_jsonl(out / "events.jsonl") if e["event"] == "setup"]
    assert list(setup["phases"]) == ["model", "data", "checkpoint", "other"]  # in process: no imports, no group
    assert sum(setup["phases"].values()) == pytest.approx(setup["setup_s"]) and setup["setup_s"] > 0
    (ledger,) = [e for e in read_jsonl(out / "events.jsonl") if e["event"] == "ledger"]  # written as it ended
    assert ledger["steps"] == 3 and ledger["setup_s"] == pytest.approx(setup["setup_s"])
    parts = ("setup_s", "train_s", "eval_s", "save_s", "other_s")
    assert sum(ledger[k] for k in parts) == pytest.approx(ledger["total_s"]) and ledger["train_s"] > 0
    assert ledger["save_s"] > 0  # two synchronous saves blocked the loop


def test_a_near_deadline_stops_before_the_first_step_and_saves(tmp_path, demo_data):
    out = tmp_path / "run"
    with trainer_here(out, demo_data, "--training.max_steps", "50",
                      deadline=Deadline(0.0, "a test deadline", [])) as trainer:  # long past
        end = trainer.run_loop()
        assert end.end is End.STOPPED and end.reason == "deadline (a test deadline)"
        assert trainer.train.step == 0


def test_checking_the_stop_has_no_side_effect_and_the_commit_is_its_own_step(tmp_path, demo_data):
    out = tmp_path / "run"
    with trainer_here(out, demo_data, "--training.max_steps", "5", "--training.async_save", "true",
                      drill=Drill.parse("save=0.5")) as trainer:
        batch = trainer.stream.next_batch()
        trainer.record(batch, *trainer.train_step(batch))
        trainer.save("periodic", asynchronous=True)
        votes = trainer.agree()
        assert votes.save_in_flight  # the drill holds the write for 0.5 s
        for _ in range(3):
            assert trainer.stop_check(votes) is None
        assert trainer.ckpt.pending is not None and not (out / "checkpoints" / "step-1").exists()
        trainer.ckpt.pending.future.result()  # written: the next boundary's agreement says so
        votes = trainer.agree()
        assert not votes.save_in_flight and trainer.ckpt.pending is not None
        trainer.commit_finished_save(votes)
        assert trainer.ckpt.pending is None and (out / "checkpoints" / "step-1").is_dir()
        assert trainer.clock.last["save_async"] >= 0.5
        assert [e["event"] for e in read_jsonl(out / "events.jsonl")][-1] == "save"


def test_a_drilled_launch_says_so_and_slows_its_steps(tmp_path, demo_data):
    out = tmp_path / "run"
    with trainer_here(out, demo_data, "--training.max_steps", "3", drill=Drill.parse("step=0.3")) as trainer:
        trainer.run_loop()
        assert trainer.clock.step_seconds >= 0.3
    (drill,) = [e for e in read_jsonl(out / "events.jsonl") if e["event"] == "drill"]
    assert drill["seconds"] == {"step": 0.3}

