"""Weights & Biases, offline (no network): one W&B run per training run, resumed by every job of a chain, each
step's point once even when a SIGKILL makes the next job train steps again.

The history is read back from the transaction logs W&B writes offline (`offline-run-*/run-ID.wandb`, what
`wandb sync` uploads) with the sink's own reader (gpt_simple.journal.wandb_sink.transaction_log: LevelDB's log format
around W&B's protobuf records); wandb 0.31 has no public Python reader for them.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from gpt_simple.run_dir import read_jsonl
from gpt_simple.journal.wandb_sink import history_rows, transaction_log
from helpers.paths import PYTHON, ROOT
from helpers.train import TINY, child_env, events, finish, metrics, run_train, start_train, status_word

pytest.importorskip("wandb")

STEPS = 20
ARGS = ("--training.max_steps", str(STEPS), "--training.save_steps", "3", "--training.tensorboard", "false",
        "--training.peak_flops", "1e12", "--eval.every_steps", "4", "--eval.tokens", "4096",
        "--wandb.enabled", "true", "--wandb.mode", "offline",
        "--wandb.project", "gpt-simple-test", "--wandb.tags", "['ci', 'offline']")


def wandb_env(tmp_path: Path) -> dict:
    # offline, files inside the test's folder, no error reports to W&B's servers, no API key to find
    return child_env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wb"), WANDB_ERROR_REPORTING="false",
                     WANDB_API_KEY="", WANDB_CONFIG_DIR=str(tmp_path / "wb-config"),
                     WANDB_CACHE_DIR=str(tmp_path / "wb-cache"))


# ---------------------------------------------------------------------------------------------------------
# reading W&B's offline transaction logs
def offline_runs(tmp_path: Path, run_id: str) -> list[Path]:
    """One folder per job that logged to the W&B run, oldest first (named offline-run-TIME-ID)."""
    return sorted((tmp_path / "wb" / "wandb").glob(f"offline-run-*-{run_id}"))


def history(run_folder: Path) -> list[dict]:
    (log,) = run_folder.glob("run-*.wandb")
    return history_rows(log)


def updates(run_folder: Path, kind: str) -> dict:
    """The run's `summary` or `config` as its records updated it, key by key."""
    (log,) = run_folder.glob("run-*.wandb")
    out = {}
    for r in transaction_log(log):
        if r.WhichOneof("record_type") == kind:
            out.update({item.key: json.loads(item.value_json) for item in getattr(r, kind).update if item.key})
    return out


def summary(run_folder: Path) -> dict:
    return updates(run_folder, "summary")


def run_records(run_folder: Path) -> list:
    (log,) = run_folder.glob("run-*.wandb")
    return [r.run for r in transaction_log(log) if r.WhichOneof("record_type") == "run"]


def config(run_folder: Path) -> dict:
    return updates(run_folder, "config")


def exit_codes(run_folder: Path) -> list[int]:
    (log,) = run_folder.glob("run-*.wandb")
    return [r.exit.exit_code for r in transaction_log(log) if r.WhichOneof("record_type") == "exit"]


def points(folders: list[Path], key: str) -> list[tuple[int, float]]:
    """(training step, value) of every row holding `key`, over the jobs in order."""
    return [(row["step"], row[key]) for folder in folders for row in history(folder) if key in row]


def train_losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metrics(out) if r.get("type") != "eval"]


def wait_for_step(out: Path, proc, step: int) -> None:
    end = time.time() + 120
    while time.time() < end and proc.poll() is None:
        if any(r["step"] >= step for r in read_jsonl(out / "metrics.jsonl")):  # skips a line being written
            return
        time.sleep(0.05)
    raise AssertionError(f"the job never reached step {step} (exit {proc.poll()})")


# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_sigterm_chain_is_one_wandb_run_with_each_step_once(tmp_path, demo_data):
    out, env = tmp_path / "run", wandb_env(tmp_path)
    for stop_after in (3, 8):
        proc = start_train(out, demo_data, *ARGS, env=env)
        wait_for_step(out, proc, stop_after)
        proc.send_signal(signal.SIGTERM)
        code, stdout, stderr = finish(proc)
        assert code == 0 and status_word(out) == "STOPPED", stderr[-3000:]
    run_train(out, demo_data, *ARGS, env=env)
    assert status_word(out) == "COMPLETED"

    run_id = json.loads((out / "wandb.json").read_text())["id"]
    jobs = offline_runs(tmp_path, run_id)
    assert len(jobs) == 3, f"one offline run folder per job, all of W&B run {run_id}: {jobs}"
    assert len(list((tmp_path / "wb" / "wandb").glob("offline-run-*"))) == 3, "a job started another W&B run"
    assert all(r.run_id == run_id for job in jobs for r in run_records(job))

    # each step once, with the values of metrics.jsonl (which equal an uninterrupted run's: test_train)
    assert points(jobs, "train/loss") == train_losses(out)
    assert [s for s, _ in points(jobs, "train/loss")] == list(range(1, STEPS + 1))
    assert [s for s, _ in points(jobs, "train/lr")] == list(range(1, STEPS + 1))
    evals = [r for r in metrics(out) if r.get("type") == "eval"]
    assert [r["step"] for r in evals][:3] == [4, 8, 12]
    assert points(jobs, "eval/loss") == [(r["step"], r["loss"]) for r in evals]
    saves = [e["step"] for e in events(out) if e["event"] == "save"]
    assert [s for s, _ in points(jobs, "checkpoint/total_s")] == saves

    # the status transitions as each job's final W&B state, and the config it trained with
    assert [summary(job)["status"] for job in jobs] == ["STOPPED", "STOPPED", "COMPLETED"]
    assert summary(jobs[-1])["step"] == STEPS
    assert [exit_codes(job) for job in jobs] == [[0], [0], [0]]
    assert {"training", "model", "wandb"} <= set(config(jobs[-1]))


@pytest.mark.slow
def test_steps_replayed_after_a_sigkill_are_not_logged_twice(tmp_path, demo_data):
    out, env = tmp_path / "run", wandb_env(tmp_path)
    proc = start_train(out, demo_data, *ARGS, env=env)
    wait_for_step(out, proc, 8)  # past the checkpoint at step 6, before the one at 9 (most of the time)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and W&B's service with it, as the OOM killer or a node loss
    proc.wait()
    sent = json.loads((out / "wandb.json").read_text())["logged"]["train"]
    run_id = json.loads((out / "wandb.json").read_text())["id"]
    (log,) = offline_runs(tmp_path, run_id)[0].glob("run-*.wandb")
    # W&B flushes its log every second: whether the kill caught points in its buffer depends on timing. Cut the
    # log in the middle of a record, as a kill during W&B's write leaves it, so that some points the high-water
    # mark counts as sent are not in W&B's log, always.
    size = log.stat().st_size
    with open(log, "r+b") as f:
        f.truncate(max(7, size // 2))
    run_train(out, demo_data, *ARGS, env=env)
    assert status_word(out) == "COMPLETED"
    resumed = next(e for e in events(out) if e["event"] == "resume")
    assert resumed["step"] < sent, "no step was trained twice: the test did not test the replay"

    jobs = offline_runs(tmp_path, run_id)
    assert len(jobs) == 2
    killed, last = (points([job], "train/loss") for job in jobs)
    # W&B's buffer died with the killed job: the points it never wrote are sent again by the next job (which
    # trains those steps again, identically), and nothing the killed job's log holds is sent twice
    assert killed + last == train_losses(out)
    assert [s for s, _ in killed + last] == list(range(1, STEPS + 1))
    assert len(killed) < sent, "every point survived in the killed job's log: the resend was not tested"
    saves = [e["step"] for e in events(out) if e["event"] == "save"]
    assert [s for s, _ in points(jobs, "checkpoint/total_s")] == saves == sorted(set(saves))
    assert points(jobs, "eval/loss") == [(r["step"], r["loss"]) for r in metrics(out) if r.get("type") == "eval"]
    assert exit_codes(jobs[0]) == []  # killed: its W&B run never finished
    assert summary(jobs[1])["status"] == "COMPLETED"


def test_a_wandb_failure_is_one_warning_and_training_goes_on(tmp_path, demo_data):
    """Online with no API key anywhere (and a server address that refuses): W&B cannot start."""
    out = tmp_path / "run"
    env = {k: v for k, v in wandb_env(tmp_path).items() if k != "WANDB_MODE"}
    env.update(HOME=str(tmp_path), WANDB_BASE_URL="http://127.0.0.1:9")
    r = run_train(out, demo_data, *ARGS, "--training.max_steps", "3", "--wandb.mode", "online", env=env)
    assert status_word(out) == "COMPLETED"
    (line,) = [l for l in r.stderr.splitlines() if "W&B" in l]
    assert line.startswith("warning: W&B: could not start the W&B run") and "training goes on" in line
    assert "Traceback" not in r.stderr


# train.py as if wandb were not installed: an entry of None in sys.modules makes `import wandb` fail
WITHOUT_WANDB = ("import runpy, sys; sys.modules['wandb'] = None; sys.argv = sys.argv[1:]; "
                 "runpy.run_path(sys.argv[0], run_name='__main__')")


def train_without_wandb(out: Path, demo_data: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-c", WITHOUT_WANDB, str(ROOT / "train.py"), *TINY, "--data.dir", str(demo_data),
                           "--training.output_dir", str(out), *args],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)


def test_wandb_disabled_never_imports_it(tmp_path, demo_data):
    out = tmp_path / "run"
    r = train_without_wandb(out, demo_data, "--training.max_steps", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert status_word(out) == "COMPLETED"
    assert not (out / "wandb.json").exists() and not (out / "wandb").exists()


def test_wandb_enabled_without_the_package_is_one_line(tmp_path, demo_data):
    out = tmp_path / "run"
    r = train_without_wandb(out, demo_data, "--wandb.enabled", "true")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    (line,) = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert "wandb package is not installed" in line and "gpt-simple[wandb]" in line
    assert not (out / "wandb.json").exists()
