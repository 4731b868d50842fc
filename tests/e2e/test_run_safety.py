"""Run safety with real processes: one live job per run (the lease), transient failures resumable, set-up bounded.
(The lease logic alone: unit/test_lease.py.)"""
import json
import os
import signal
import socket
import subprocess
import time

import pytest

from helpers.train import ROOT, PYTHON, child_env, events, finish, losses, run_train, start_train, status_word

STEPS = ["--training.max_steps", "16", "--training.save_steps", "4", "--training.async_save", "false"]


LONG = ["--training.max_steps", "120"]  # the concurrent test's first launch must outlive the second's start-up


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_data):
    """Uninterrupted losses of 120 steps; the schedule does not depend on max_steps (decay_steps is set), so the
    16-step runs are compared with its first 16."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run_train(out, demo_data, *STEPS, *LONG)
    return losses(out)


@pytest.fixture(scope="module")
def reference2(tmp_path_factory, demo_data):
    out = tmp_path_factory.mktemp("ref2") / "run"
    run_train(out, demo_data, *STEPS, nproc=2)
    return losses(out)


def wait_for(predicate, proc, timeout=120, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout}s")


def n_steps(out):
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def decision(out):
    proc = subprocess.run([PYTHON, str(ROOT / "status.py"), str(out), "--decision"], capture_output=True, text=True)
    return proc.stdout.rstrip("\n").split("\t")


def files(out):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []


@pytest.mark.slow
def test_second_launch_refused_first_completes(tmp_path, demo_data, reference):
    out = tmp_path / "run"
    first = start_train(out, demo_data, *STEPS, *LONG)
    wait_for(lambda: n_steps(out) >= 2, first, what="steps")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "LEASE"
              and "metrics" not in p.name and "events" not in p.name and "run_state" not in p.name}
    t0 = time.time()
    second = run_train(out, demo_data, *STEPS, check=False, timeout=60)
    assert second.returncode == 75, second.stderr[-2000:]
    assert time.time() - t0 < 30
    lines = [ln for ln in second.stderr.splitlines() if "another job holds this run" in ln]
    assert len(lines) == 1 and f"pid {first.pid} on {socket.gethostname()}" in lines[0], second.stderr
    assert "Traceback" not in second.stderr
    assert decision(out)[1] == "held"
    code, _, stderr = finish(first)
    assert code == 0, stderr[-3000:]
    assert status_word(out) == "COMPLETED"
    assert {e.get("launch") for e in events(out)} == {1}  # nothing from the second launch
    assert json.loads((out / "run_state.json").read_text())["launches"] == 1
    assert not (out / "LEASE").exists()
    assert losses(out) == reference and len(reference) == 120
    for p, mtime in before.items():  # files written before the second launch are untouched by it (or by then gone)
        assert not p.exists() or p.stat().st_mtime_ns == mtime or "checkpoints" in str(p)


@pytest.mark.slow
def test_lease_of_killed_job_taken_over(tmp_path, demo_data, reference):
    out = tmp_path / "run"
    first = start_train(out, demo_data, *STEPS)
    wait_for(lambda: (out / "checkpoints" / "step-4-periodic" / "COMMITTED").exists() or
             any((p / "COMMITTED").exists() for p in (out / "checkpoints").glob("step-*")), first,
             what="a committed checkpoint")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert (out / "LEASE").exists()
    proc = run_train(out, demo_data, *STEPS)
    assert "took over the lease" in proc.stderr
    assert status_word(out) == "COMPLETED"
    assert any(e["event"] == "lease_takeover" for e in events(out))
    assert losses(out) == reference[:16]


def test_lease_on_another_host_respected_until_stale(tmp_path, demo_data):
    out = tmp_path / "run"
    out.mkdir()
    holder = {"host": "node-b", "pid": 4242, "job": "slurm:77", "token": "x", "started_at": time.time() - 30,
              "heartbeat_at": time.time()}
    (out / "LEASE").write_text(json.dumps(holder))
    proc = run_train(out, demo_data, "--training.max_steps", "3", check=False, timeout=120)
    assert proc.returncode == 75 and "pid 4242 on node-b, job slurm:77" in proc.stderr, proc.stderr[-2000:]
    assert files(out) == ["LEASE"]  # nothing written
    assert decision(out)[:2] == ["NONE", "held"]
    (out / "LEASE").write_text(json.dumps({**holder, "heartbeat_at": time.time() - 1000}))  # stale (> 900 s)
    run_train(out, demo_data, "--training.max_steps", "3")
    assert status_word(out) == "COMPLETED"


def worker(agent_pid, rank):
    for pid in subprocess.run(["pgrep", "-P", str(agent_pid)], capture_output=True, text=True).stdout.split():
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


@pytest.mark.slow
def test_worker_killed_under_torchrun_is_transient_then_resumes(tmp_path, demo_data, reference2):
    out = tmp_path / "run"
    proc = start_train(out, demo_data, *STEPS, nproc=2)
    wait_for(lambda: n_steps(out) >= 6, proc, what="steps")
    pid = worker(proc.pid, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    t0 = time.time()
    code, _, stderr = finish(proc, timeout=120)
    assert code != 0 and time.time() - t0 < 90
    word, action, reason = decision(out)
    assert (word, action) == ("STOPPED", "resume") and reason.startswith("transient: "), (word, reason, stderr[-3000:])
    print("decision after the kill:", word, action, reason, f"({time.time() - t0:.1f}s)")
    run_train(out, demo_data, *STEPS, nproc=2)
    assert status_word(out) == "COMPLETED"
    assert losses(out) == reference2


@pytest.mark.slow
def test_rank_that_never_joins_bounded_then_resumes(tmp_path, demo_data, reference):
    out = tmp_path / "run"
    out.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="2")
    t0 = time.time()
    proc = run_train(out, demo_data, *STEPS, "--training.setup_timeout_seconds", "5", env=env, check=False,
                     timeout=120)
    assert proc.returncode != 0 and time.time() - t0 < 60, proc.stderr[-2000:]
    assert "set-up gave up after at most 5s" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    word, action, reason = decision(out)
    assert (word, action) == ("STOPPED", "resume") and reason.startswith("transient: "), reason
    assert not (out / "LEASE").exists()
    run_train(out, demo_data, *STEPS)  # resubmitted with a working world
    assert status_word(out) == "COMPLETED"
    assert losses(out) == reference[:16]


@pytest.mark.slow
def test_stop_signal_during_hung_setup_ends_promptly(tmp_path, demo_data):
    out = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="2")
    proc = start_train(out, demo_data, *STEPS, "--training.setup_timeout_seconds", "600", env=env)
    time.sleep(8)  # imports done, waiting for rank 1 in process-group creation
    assert proc.poll() is None
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    code, _, stderr = finish(proc, timeout=60)
    assert time.time() - t0 < 30 and code == 128 + signal.SIGTERM, stderr[-2000:]
    assert "during set-up" in stderr


def test_local_loop_does_not_train_a_held_run(tmp_path):
    """The templates' `held` branch: the local loop names the holder, does not train, and exits 5."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "LEASE").write_text(json.dumps({"host": "node-b", "pid": 4242, "job": "slurm:77", "token": "x",
                                           "started_at": time.time(), "heartbeat_at": time.time()}))
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "local_loop.sh")], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=child_env(PYTHON=PYTHON, GPT_SIMPLE_OUTPUT_DIR=str(out)))
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "pid 4242 on node-b" in proc.stdout and "attempt" not in proc.stdout
    assert not (out / "run_state.json").exists()
