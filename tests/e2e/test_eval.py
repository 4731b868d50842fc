"""Held-out evaluation end to end: it never changes training; a chain of stopped or killed jobs records exactly the
evaluations of one uninterrupted job, each once; `gpt-simple eval` gives the run's figures on 1 or 2 processes;
and no validation document is ever trained on. The demo corpus carries a validation split per bucket."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt_simple.checkpoint import load_model_state
from gpt_simple.data.shards import Bucket
from helpers.data import read_audit
from helpers.paths import PYTHON, ROOT
from helpers.train import TORCHRUN, child_env, finish, metrics, run_train, start_train, status_word

EVAL = ("--training.peak_flops", "1e12", "--training.max_steps", "9", "--training.save_steps", "4",
        "--eval.tokens", "512")
ON = ("--eval.every_steps", "2", "--eval.at_end", "true")
GPT_SIMPLE = str(Path(PYTHON).with_name("gpt-simple"))
# The chains' launches are slowed through the test seam, so a signal or a kill sent after step k lands mid-run on
# any machine (the tests assert it did); the drill only waits, so the records are those of an undrilled run.
SLOW_STEPS = {"GPT_SIMPLE_DRILL": "step=0.3"}


def train_records(out) -> list[dict]:
    return [{k: r[k] for k in ("step", "loss", "lr", "grad_norm", "tokens")} for r in metrics(out)
            if r.get("type") != "eval"]


def eval_records(out) -> list[dict]:
    """The evaluation records, without their wall-clock stamp (the one field that differs between runs)."""
    return [{k: v for k, v in r.items() if k != "time"} for r in metrics(out) if r.get("type") == "eval"]


def wait_for_step(out: Path, step: int, proc: subprocess.Popen) -> None:
    while proc.poll() is None:
        done = [r["step"] for r in metrics(out)] if (out / "metrics.jsonl").exists() else []
        if done and max(done) >= step:
            return
        time.sleep(0.05)


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_model_state(a), load_model_state(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_eval_changes_nothing_and_a_stopped_chain_records_the_same_evaluations(tmp_path, demo_data):
    off, on, chain = tmp_path / "off", tmp_path / "on", tmp_path / "chain"
    run_train(off, demo_data, *EVAL)
    run_train(on, demo_data, *EVAL, *ON)
    assert train_records(on) == train_records(off)
    assert same_weights(off / "checkpoints" / "step-9-final", on / "checkpoints" / "step-9-final")
    reference = eval_records(on)
    assert [r["step"] for r in reference] == [2, 4, 6, 8, 9]
    assert all(set(r["loss_by_bucket"]) == {"code", "prose"} and r["loss"] > 0 for r in reference)

    # SIGTERM twice, each right after an evaluation was due: the chain's records equal the reference's
    for stop_after in (2, 5):
        proc = start_train(chain, demo_data, *EVAL, *ON, env=child_env(**SLOW_STEPS))
        wait_for_step(chain, stop_after, proc)
        proc.send_signal(signal.SIGTERM)
        assert finish(proc)[0] == 0
        assert status_word(chain) == "STOPPED"  # the signal landed mid-run: the launch did not finish the run
        assert stop_after <= max(r["step"] for r in metrics(chain)) < 9
    run_train(chain, demo_data, *EVAL, *ON)
    assert status_word(chain) == "COMPLETED"
    assert eval_records(chain) == reference
    assert train_records(chain) == train_records(on)


@pytest.mark.slow
def test_a_killed_chain_records_the_same_evaluations_each_once(tmp_path, demo_data):
    """SIGKILL lands anywhere (mid-evaluation, mid-save, after an evaluation whose step was never checkpointed):
    the resumed job drops what the killed one logged after its checkpoint and evaluates those steps again."""
    on, chain = tmp_path / "on", tmp_path / "chain"
    run_train(on, demo_data, *EVAL, *ON)
    for kill_after in (3, 6):
        proc = start_train(chain, demo_data, *EVAL, *ON, "--training.save_steps", "2", env=child_env(**SLOW_STEPS))
        wait_for_step(chain, kill_after, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL  # killed, not finished: the kill landed mid-run
        assert status_word(chain) != "COMPLETED" and kill_after <= max(r["step"] for r in metrics(chain)) < 9
    run_train(chain, demo_data, *EVAL, *ON, "--training.save_steps", "2")
    assert status_word(chain) == "COMPLETED"
    assert eval_records(chain) == eval_records(on)
    assert train_records(chain) == train_records(on)


def eval_json(*cmd: str) -> dict:
    proc = subprocess.run([*cmd, "--json"], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def document_digests(bucket: Bucket, docs) -> set[str]:
    return {hashlib.sha256(np.asarray(bucket.document(int(d))).tobytes()).hexdigest() for d in docs}


@pytest.mark.slow
def test_eval_command_world_sizes_and_held_out_documents(tmp_path, demo_data):
    run = tmp_path / "run"
    run_train(run, demo_data, *EVAL, *ON, "--data.audit", "true")
    (last,) = [r for r in eval_records(run) if r["step"] == 9]

    # `gpt-simple eval` on the run's last checkpoint prints the run's own evaluation of that step
    one = eval_json(GPT_SIMPLE, "eval", str(run))
    assert one["step"] == 9 and one["tokens"] == last["tokens"]
    assert one["loss"] == pytest.approx(last["loss"], rel=1e-6)
    # ... and on 2 processes (each evaluates its slice, the sums are reduced): the same loss to reduction order
    two = eval_json(TORCHRUN, "--nproc_per_node", "2", "-m", "gpt_simple", "eval", str(run))
    assert two["tokens"] == one["tokens"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert two["loss_by_bucket"] == pytest.approx(one["loss_by_bucket"], rel=1e-6)

    # a run on 2 ranks evaluates the same sequences: its validation loss matches the 1-rank run's
    run2 = tmp_path / "run2"
    run_train(run2, demo_data, *EVAL, *ON, "--training.max_steps", "3", nproc=2)
    (first,) = [r for r in eval_records(run) if r["step"] == 2]
    (first2,) = [r for r in eval_records(run2) if r["step"] == 2]
    assert first2["step"] == 2 and first2["tokens"] == first["tokens"]
    assert first2["loss"] == pytest.approx(first["loss"], rel=1e-4)

    # no validation document was trained on: the audit names training-bucket documents only, none equal to one
    # of the split's
    for name in ("code", "prose"):
        train, val = Bucket(demo_data / name), Bucket(demo_data / name / "val")
        trained = {span[1] for line in read_audit(run) for span in line["spans"] if span[0] == name}
        assert trained and max(trained) < train.n_docs
        assert not document_digests(train, trained) & document_digests(val, range(val.n_docs))


@pytest.mark.slow
def test_the_stop_decision_budgets_for_a_due_evaluation(tmp_path, demo_data):
    """Each evaluation takes 3 s more than it should (a slow one) and the reserve is 0.2 s: the job stops before a
    step whose evaluation would not fit, so nothing runs past the deadline, and the next job evaluates what is
    due. Without the budget the last evaluation would start ~1 s before the deadline and end after it."""
    out = tmp_path / "run"
    args = (*EVAL, "--training.max_steps", "100000", "--training.save_steps", "0", "--eval.every_steps", "3",
            "--training.walltime_reserve_seconds", "0.2", "--training.log_steps", "1")
    env = child_env(GPT_SIMPLE_MAX_RUNTIME="15", GPT_SIMPLE_DRILL="eval=3")
    run_train(out, demo_data, *args, env=env, timeout=120)
    state = json.loads((out / "run_state.json").read_text())
    assert state["status"] == "STOPPED" and state["reason"].startswith("deadline"), state
    (ckpt,) = [p for p in (out / "checkpoints").iterdir() if p.name.endswith("-shutdown")]
    committed_at = json.loads((ckpt / "COMMITTED").read_text())["committed_at"]
    assert committed_at < state["deadline_at"], (committed_at, state["deadline_at"])
    evaluated = [r["step"] for r in eval_records(out)]
    assert evaluated and evaluated == list(range(3, state["step"] + 1, 3))
