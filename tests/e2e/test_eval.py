"""Held-out evaluation end to end: it never changes training, and a chain of stopped jobs records exactly the
evaluations of one uninterrupted job, each once."""
from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from gpt_simple.checkpoint import load_model_state
from helpers.train import finish, metrics, run_train, start_train, status_word

EVAL = ("--training.peak_flops", "1e12", "--training.max_steps", "9", "--training.save_steps", "4",
        "--eval.tokens", "512")
ON = ("--eval.every_steps", "2", "--eval.at_end", "true")


@pytest.fixture
def data_with_val(tmp_path, demo_data) -> Path:
    """The demo corpus plus a validation split per bucket (a copy of its first shard: the test is about the
    mechanics, not about held-out documents)."""
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    for bucket in (p for p in data.iterdir() if p.is_dir()):
        val = bucket / "val"
        val.mkdir()
        first = sorted(bucket.glob("*.idx"))[0]
        shutil.copy(first, val)
        shutil.copy(first.with_suffix(".bin"), val)
    return data


def train_records(out) -> list[dict]:
    return [{k: r[k] for k in ("step", "loss", "lr", "grad_norm", "tokens")} for r in metrics(out)
            if r.get("type") != "eval"]


def eval_records(out) -> list[dict]:
    return [r for r in metrics(out) if r.get("type") == "eval"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_model_state(a), load_model_state(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_eval_changes_nothing_and_a_stopped_chain_records_the_same_evaluations(tmp_path, data_with_val):
    off, on, chain = tmp_path / "off", tmp_path / "on", tmp_path / "chain"
    run_train(off, data_with_val, *EVAL)
    run_train(on, data_with_val, *EVAL, *ON)
    assert train_records(on) == train_records(off)
    assert same_weights(off / "checkpoints" / "step-9-final", on / "checkpoints" / "step-9-final")
    reference = eval_records(on)
    assert [r["step"] for r in reference] == [2, 4, 6, 8, 9]
    assert all(set(r["loss_by_bucket"]) == {"code", "prose"} and r["loss"] > 0 for r in reference)

    # SIGTERM twice, each right after an evaluation was due: the chain's records equal the reference's
    for stop_after in (2, 5):
        proc = start_train(chain, data_with_val, *EVAL, *ON)
        while True:
            done = [r["step"] for r in metrics(chain)] if (chain / "metrics.jsonl").exists() else []
            if done and max(done) >= stop_after or proc.poll() is not None:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert finish(proc)[0] == 0
        assert status_word(chain) in ("STOPPED", "COMPLETED")
    run_train(chain, data_with_val, *EVAL, *ON)
    assert status_word(chain) == "COMPLETED"
    assert eval_records(chain) == reference
    assert train_records(chain) == train_records(on)
