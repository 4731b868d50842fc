"""Graceful shutdown: real signals to real (torchrun) runs, the stop file, CRASHED. (Deadline resolution:
unit/test_shutdown.py.)"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from gpt_simple.journal import events as catalogue
from helpers.train import ROOT, child_env, events, finish, losses, metrics, run_train, start_train, status_word


# -- real processes ----------------------------------------------------------------------------------------------
def launch(out, data, *args, nproc=1, env=None):
    return start_train(out, data, "--training.max_steps", "100000", "--optimizer.decay_steps", "0", *args,
                       nproc=nproc, env=env)


def wait_for_steps(out, n, proc, timeout=120):
    deadline = time.time() + timeout
    path = out / "metrics.jsonl"
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no {n} steps within {timeout}s")


def shutdown_checkpoints(out):
    return sorted(p.name for p in (out / "checkpoints").glob("step-*-shutdown") if (p / "COMMITTED").exists())


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_signal_to_torchrun_ends_in_committed_shutdown_checkpoint(tmp_path, demo_data, sig):
    out = tmp_path / "run"
    proc = launch(out, demo_data, nproc=2)
    wait_for_steps(out, 3, proc)
    proc.send_signal(getattr(signal, sig))  # to the torchrun agent, which forwards it to both ranks
    code, stdout, stderr = finish(proc)
    # The agent itself re-raises the signal after its workers exit (exit 1 whatever they did): the
    # workers' own outcome is the status file, which is why orchestrators read status, not exit codes.
    assert "STOPPED: signal" in stdout, stderr[-3000:]
    assert status_word(out) == "STOPPED"
    state = json.loads((out / "run_state.json").read_text())
    assert state["reason"] == f"signal {sig}"
    ckpts = shutdown_checkpoints(out)
    assert ckpts == [f"step-{state['step']}-shutdown"]
    assert sorted(p.name for p in (out / "checkpoints" / ckpts[0] / "rng").iterdir()) == \
        ["rank-0.json", "rank-1.json"]
    assert [e["event"] for e in events(out) if e["event"] != "ledger"][-2:] == ["save", "stop"]  # ledger: issue 19


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGUSR2"])
def test_other_graceful_signals_single_process(tmp_path, demo_data, sig):
    out = tmp_path / "run"
    proc = launch(out, demo_data)
    wait_for_steps(out, 2, proc)
    proc.send_signal(getattr(signal, sig))
    code, _, stderr = finish(proc)
    assert code == 0, stderr[-3000:]
    assert status_word(out) == "STOPPED"
    assert len(shutdown_checkpoints(out)) == 1


@pytest.mark.slow
def test_signal_during_setup_is_honoured(tmp_path, demo_data):
    out = tmp_path / "run"
    proc = launch(out, demo_data)
    time.sleep(0.5)  # still importing torch / building the model
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    code, _, stderr = finish(proc)
    assert code == 0, stderr[-3000:]
    assert status_word(out) == "STOPPED"
    assert shutdown_checkpoints(out) == ["step-0-shutdown"]
    assert not (out / "metrics.jsonl").exists() or (out / "metrics.jsonl").read_text() == ""


def test_first_sigint_sets_flag_second_exits_at_once(tmp_path):
    """The real handlers in a real process: the first Ctrl-C only asks for a stop, the second exits now."""
    script = ("import time, sys\n"
              "from gpt_simple import shutdown\n"
              "shutdown.install()\n"
              "print('ready', flush=True)\n"
              "while not shutdown.FLAGS.requested: time.sleep(0.01)\n"
              "print('stop requested by', shutdown.FLAGS.signal_name, flush=True)\n"
              "time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline().strip() == "stop requested by SIGINT"
    started = time.time()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 130
    assert time.time() - started < 5


@pytest.mark.slow
def test_deadline_from_env_stops_with_reserve(tmp_path, demo_data):
    out = tmp_path / "run"
    proc = launch(out, demo_data, "--training.walltime_reserve_seconds", "2",
                  env=child_env(GPT_SIMPLE_MAX_RUNTIME="12"))
    code, stdout, stderr = finish(proc)
    assert code == 0, stderr[-3000:]
    state = json.loads((out / "run_state.json").read_text())
    assert (status_word(out), state["reason"], state["deadline_source"]) == \
        ("STOPPED", "deadline (GPT_SIMPLE_MAX_RUNTIME)", "GPT_SIMPLE_MAX_RUNTIME")
    ended = max(e["time"] for e in events(out))
    assert ended <= state["first_started_at"] + 12.5  # exited before the deadline, checkpoint included
    assert len(shutdown_checkpoints(out)) == 1


@pytest.mark.slow
def test_stop_file_via_cli(tmp_path, demo_data):
    out = tmp_path / "run"
    proc = launch(out, demo_data, nproc=2)
    wait_for_steps(out, 2, proc)
    subprocess.run([sys.executable, "-m", "gpt_simple", "stop", str(out)], check=True, capture_output=True)
    code, _, stderr = finish(proc)
    assert code == 0, stderr[-3000:]
    assert json.loads((out / "run_state.json").read_text())["reason"] == "stop file"
    assert not (out / "STOP").exists()  # consumed: the next launch trains


@pytest.mark.slow
def test_stop_during_async_save_commits_it_and_resumes_exactly(tmp_path, demo_data):
    """A stop while a periodic async save is in flight waits for it; the run resumes bit-exactly."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    common = ("--training.save_steps", "1", "--training.async_save", "true", "--optimizer.decay_steps", "30")
    proc = launch(out, demo_data, *common)
    wait_for_steps(out, 3, proc)
    proc.send_signal(signal.SIGTERM)
    code, _, stderr = finish(proc)
    assert code == 0, stderr[-3000:]
    step = json.loads((out / "run_state.json").read_text())["step"]
    # Every step saved asynchronously, so the stop found a save of this very step: no duplicate shutdown save.
    assert (out / "checkpoints" / f"step-{step}" / "COMMITTED").exists()
    assert shutdown_checkpoints(out) == []
    run_train(out, demo_data, *common, "--training.max_steps", str(step + 3))
    run_train(ref, demo_data, *common, "--training.max_steps", str(step + 3))
    assert losses(out) == losses(ref)


@pytest.mark.slow
def test_kill_9_is_reported_as_crashed(tmp_path, demo_data):
    out = tmp_path / "run"
    proc = launch(out, demo_data)
    wait_for_steps(out, 2, proc)
    assert status_word(out) == "RUNNING"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert status_word(out) == "CRASHED"


@pytest.mark.slow
def test_a_job_limit_with_no_room_to_train_ends_in_error_after_the_cap(tmp_path, demo_data):
    """GPT_SIMPLE_MAX_RUNTIME shorter than set-up plus the reserve: each launch reaches its deadline before its first
    step. It says so; after IDLE_CAP such launches in a row the next is an ERROR naming why (a template would
    otherwise resubmit it forever, each launch saving where it started)."""
    from gpt_simple.trainer import IDLE_CAP
    out = tmp_path / "run"
    env = child_env(GPT_SIMPLE_MAX_RUNTIME="6")
    args = ("--training.max_steps", "50", "--training.walltime_reserve_seconds", "10")
    for n in range(1, IDLE_CAP + 1):
        proc = run_train(out, demo_data, *args, env=env)
        assert f"reached its deadline before its first step ({n} in a row)" in proc.stderr, proc.stderr
        assert status_word(out) == "STOPPED"
    proc = run_train(out, demo_data, *args, env=env, check=False)
    assert proc.returncode == 1, proc.stderr
    assert status_word(out) == "ERROR"
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {IDLE_CAP + 1} launches in a row reached their deadline before training a step")
    assert "training.walltime_reserve_seconds" in last
    assert events(out)[-1]["event"] == catalogue.Error.kind
    proc = run_train(out, demo_data, *args)  # room again (no deadline): the count no longer matters, it trains
    assert status_word(out) == "COMPLETED" and metrics(out)[-1]["step"] == 50
