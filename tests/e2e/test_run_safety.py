"""Run safety with real processes: one live job per run (the lease), transient failures resumable, set-up bounded,
and the templates (local loop, Kubernetes entrypoint, SLURM chain) around a lost peer and a held run.
(The lease logic alone: unit/test_lease.py.)"""
import json
import os
import signal
import socket
import subprocess
import time

import pytest

from helpers.shared import shared_run
from helpers.train import (ROOT, PYTHON, TINY, child_env, events, finish, losses, run_train, start_train,
                           status_word)

STEPS = ["--training.max_steps", "16", "--training.save_steps", "4", "--training.async_save", "false"]


LONG = ["--training.max_steps", "120"]  # the reference: every test compares its first steps


@pytest.fixture(scope="session")
def reference(tmp_path_factory, demo_data):
    """Uninterrupted losses of 120 steps; the schedule does not depend on max_steps (decay_steps is set), so the
    16-step runs are compared with its first 16. Once per session."""
    return losses(shared_run(tmp_path_factory, "run-safety-reference",
                             lambda out: run_train(out, demo_data, *STEPS, *LONG)))


@pytest.fixture(scope="session")
def reference2(tmp_path_factory, demo_data):
    return losses(shared_run(tmp_path_factory, "run-safety-reference2",
                             lambda out: run_train(out, demo_data, *STEPS, nproc=2)))


def wait_for(predicate, proc, timeout=120, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            output = proc.stderr.read()[-2000:] if proc.stderr else ""
            raise AssertionError(f"{proc.args[:2]} exited early ({proc.returncode}): {output}")
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
    # >= 0.2 s a step: 28 steps are left when the first launch is paused, so it is still training then on any
    # machine; it stays paused (SIGSTOP: alive, holding the lease) while the second launch starts up and is
    # refused, however long that takes, then goes on
    first = start_train(out, demo_data, *STEPS, "--training.max_steps", "30",
                        env=child_env(GPT_SIMPLE_DRILL="step=0.2"))
    wait_for(lambda: n_steps(out) >= 2, first, what="steps")
    os.killpg(first.pid, signal.SIGSTOP)
    try:
        assert first.poll() is None and n_steps(out) < 30, "the first launch must still be training"
        before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "LEASE"
                  and "metrics" not in p.name and "events" not in p.name and "run_state" not in p.name}
        t0 = time.time()
        second = run_train(out, demo_data, *STEPS, check=False, timeout=60)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
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
    assert losses(out) == reference[:30] and len(reference) == 120
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


def worker(ancestor_pid, rank):
    """The pid of torchrun's worker of `rank` among the processes below `ancestor_pid` (torchrun, or a template
    that runs it)."""
    todo = [ancestor_pid]
    while todo:
        for pid in subprocess.run(["pgrep", "-P", str(todo.pop())], capture_output=True, text=True).stdout.split():
            try:
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(pid)
            todo.append(int(pid))
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
    """Rank 1 never joins: rank 0 waits in process-group creation, before the lease. SIGTERM ends it promptly, and
    it records STOPPED (a template reads a first launch that left no state as a failure)."""
    out = tmp_path / "run"
    out.mkdir()  # as the templates make it (its logs/ folder)
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
    word, action, reason = decision(out)
    assert (word, action, reason) == ("STOPPED", "resume", "signal SIGTERM during set-up")
    assert not (out / "LEASE").exists()


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


# -- the templates around these failures: the local loop, the Kubernetes entrypoint, the SLURM chain's first step
LOOP = ROOT / "scripts" / "local_loop.sh"


def loop_env(out, **extra):
    return child_env(PYTHON=PYTHON, GPT_SIMPLE_CONFIG=str(ROOT / "configs" / "tiny.toml"),
                     GPT_SIMPLE_OUTPUT_DIR=str(out), GPT_SIMPLE_RETRY_DELAY="0", **extra)


def train_args(data, *args):
    """train.py arguments for a template, which passes --config itself."""
    return [*TINY[2:], "--data.dir", str(data), "--data.demo", "false", *args]


def text(path):
    return path.read_text() if path.exists() else ""


def k8s_entrypoint(tmp_path):
    import yaml
    docs = [d for d in yaml.safe_load_all((ROOT / "k8s" / "job.yaml").read_text()) if d]
    path = tmp_path / "entrypoint.sh"
    path.write_text(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["entrypoint.sh"])
    return path


# A live job holding the run's lease and nothing else (no torch): it takes the lease at once, where a trainer
# spends seconds importing first, and releases it once a trainer's log (argv[2]) shows that the trainer was refused.
HOLDER = """
import sys, time
from pathlib import Path
from gpt_simple.lease import Lease
lease = Lease(sys.argv[1]).acquire()
print("holding", flush=True)
logs = Path(sys.argv[2])
while not any("another job holds this run" in p.read_text(errors="replace") for p in logs.parent.glob(logs.name)):
    time.sleep(0.02)
lease.release()
"""


def start_holder(out, logs="never"):
    proc = subprocess.Popen([PYTHON, "-c", HOLDER, str(out), str(logs)], cwd=ROOT, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "holding\n", proc.stderr.read()
    return proc


def run_while_held(out, script, env) -> subprocess.CompletedProcess:
    """Run a template script while a live process holds the run's lease."""
    holder = start_holder(out)
    try:
        return subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_local_loop_completes_a_torchrun_run_whose_worker_was_killed(tmp_path, demo_data, reference2):
    """A lost peer under the local loop's torchrun: the attempt ends within the bounded time as a transient
    failure, and the loop's next attempt resumes to the uninterrupted losses."""
    out = tmp_path / "run"
    with open(tmp_path / "loop.out", "w") as output:  # a file, not a pipe: nothing blocks the loop's tail
        loop = subprocess.Popen(["bash", str(LOOP), *train_args(demo_data, *STEPS)], cwd=ROOT,
                                env=loop_env(out, NPROC="2"), stdout=output, stderr=subprocess.STDOUT,
                                start_new_session=True)
    loop_log = out / "logs" / "loop.log"
    try:
        wait_for(lambda: n_steps(out) >= 6, loop, what="steps")
        pid = worker(loop.pid, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        t0 = time.time()
        wait_for(lambda: "attempt 1: trainer exit code" in text(loop_log), loop, timeout=120,
                 what="the first attempt's end")
        print(f"attempt 1 ended {time.time() - t0:.1f}s after the kill")
        assert time.time() - t0 < 90
        assert loop.wait(timeout=300) == 0, (tmp_path / "loop.out").read_text()[-3000:]
    finally:
        if loop.poll() is None:
            os.killpg(loop.pid, signal.SIGKILL)
    decisions = loop_log.read_text()
    assert "attempt 1: trainer exit code 1; run status STOPPED" in decisions, decisions
    assert "attempt 2: trainer exit code 0; run status COMPLETED" in decisions, decisions
    transient = [e for e in events(out) if e["event"] == "transient_failure"]
    assert [e["launch"] for e in transient] == [1], transient
    assert status_word(out) == "COMPLETED"
    assert losses(out) == reference2


@pytest.mark.slow
def test_local_loop_does_not_train_a_run_that_a_live_job_trains(tmp_path, demo_data):
    out = tmp_path / "run"
    first = start_train(out, demo_data, *STEPS, *LONG)
    try:
        wait_for(lambda: n_steps(out) >= 2, first, what="steps")
        proc = subprocess.run(["bash", str(LOOP), *train_args(demo_data, *STEPS)], cwd=ROOT, env=loop_env(out),
                              capture_output=True, text=True, timeout=60)
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
    code, _, stderr = finish(first)
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert f"another job holds this run: pid {first.pid} on {socket.gethostname()}" in proc.stdout
    assert "attempt" not in proc.stdout and not list((out / "logs").glob("attempt-*"))
    assert code == 0 and status_word(out) == "STOPPED", stderr[-2000:]  # the live job, undisturbed
    assert {e["launch"] for e in events(out)} == {1}


def test_local_loop_attempt_refused_by_the_lease_is_held_not_failed(tmp_path, demo_data):
    """The loop's own check found the run free, but another job took the lease before the loop's trainer did: the
    trainer exits 75 and writes nothing. Even when that job has ended by the time the loop looks again (no run
    state at all, which after an attempt would read as a failure), the loop says the run was held, exit 5."""
    out = tmp_path / "run"
    with open(tmp_path / "loop.out", "w") as output:
        loop = subprocess.Popen(["bash", str(LOOP), *train_args(demo_data, *STEPS)], cwd=ROOT, env=loop_env(out),
                                stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "attempt 1/" in text(out / "logs" / "loop.log"), loop, what="the first attempt",
                 timeout=60)
        holder = start_holder(out, out / "logs" / "attempt-*.log")  # while the trainer still imports torch
        assert loop.wait(timeout=120) == 5, (tmp_path / "loop.out").read_text()[-3000:]
        assert holder.wait(timeout=30) == 0, holder.stderr.read()
    finally:
        if loop.poll() is None:
            loop.kill()
    decisions = (out / "logs" / "loop.log").read_text()
    assert "attempt 1: trainer exit code 75" in decisions, decisions
    assert "not training: " in decisions and "attempt 2" not in decisions
    assert not (out / "run_state.json").exists() and not (out / "events.jsonl").exists()


def test_k8s_entrypoint_held_run_exits_75_without_training(tmp_path, demo_data):
    """The entrypoint's two `held` branches: held before it trains (e.g. the pod it replaces still terminates), and
    its trainer refused by the lease (the holder gone by the time it looks): exit 75, Kubernetes restarts it later;
    never the 'failed' exit code."""
    out = tmp_path / "run"
    script = k8s_entrypoint(tmp_path)
    env = child_env(PYTHON=PYTHON, GPT_SIMPLE_HOME=str(ROOT), GPT_SIMPLE_CONFIG="configs/tiny.toml",
                    GPT_SIMPLE_OUTPUT_DIR=str(out), GPT_SIMPLE_TERMINATION_LOG=str(tmp_path / "termination-log"),
                    GPT_SIMPLE_EXTRA_ARGS=" ".join(train_args(demo_data, *STEPS)), HOSTNAME="pod-0",
                    GPT_SIMPLE_FAILED_EXIT_CODE="3")
    (out / "logs").mkdir(parents=True)
    r = run_while_held(out, script, env)
    assert r.returncode == 75, r.stdout + r.stderr
    assert "another job holds this run" in (tmp_path / "termination-log").read_text()
    assert not list((out / "logs").glob("k8s-pod-0-*.log"))  # no launch
    (out / "LEASE").unlink()  # the killed holder's

    proc = subprocess.Popen(["bash", str(script)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        wait_for(lambda: "launch: " in text(out / "logs" / "k8s.log"), proc, what="the launch", timeout=60)
        holder = start_holder(out, out / "logs" / "k8s-pod-0-*.log")
        output, _ = proc.communicate(timeout=120)
        assert holder.wait(timeout=30) == 0, holder.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, output[-3000:]
    assert "trainer exit code 75" in output
    assert "Not training now" in (tmp_path / "termination-log").read_text()
    assert not (out / "run_state.json").exists()


def test_slurm_job_of_a_held_run_ends_without_training_or_successor(tmp_path, demo_data):
    """resume_chain.sh's first step outside a real cluster (a job's environment, no Slurm command is reached): a run
    held by a live job ends this job with exit 0, no training, no successor queued (a duplicate chain ends)."""
    out = tmp_path / "run"
    (out / "logs").mkdir(parents=True)
    chain = ROOT / "slurm" / "resume_chain.sh"
    env = child_env(PYTHON=PYTHON, GPT_SIMPLE_OUTPUT_DIR=str(out), GPT_SIMPLE_CONFIG="configs/tiny.toml",
                    SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="1", GPT_SIMPLE_CHAIN_SCRIPT=str(chain),
                    GPT_SIMPLE_HELD_WAIT="0")
    r = run_while_held(out, chain, env)
    log = (out / "logs" / "chain.log").read_text()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "not training: another job holds this run" in log and "successor" not in log.split("not training")[0]
    assert "launch:" not in log and "queued successor" not in log
    assert not (out / "run_state.json").exists()


@pytest.mark.slow
def test_stop_signal_while_set_up_waits_on_a_stalled_rank_records_stopped(tmp_path, demo_data, reference2):
    """Rank 1 joins the process group and then stalls (SIGSTOP) while rank 0 is in set-up, past the lease: rank 0's
    set-up collectives wait in C++. SIGTERM ends rank 0 promptly; it records STOPPED (resumable) and releases the
    lease, and the next launch completes the run with the uninterrupted losses."""
    out = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [start_train(out, demo_data, *STEPS, "--training.setup_timeout_seconds", "600",
                         env=child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), LOCAL_RANK=str(r),
                                       WORLD_SIZE="2", LOCAL_WORLD_SIZE="2"))
             for r in (0, 1)]
    try:
        wait_for(lambda: (out / "run_state.json").exists() and
                 json.loads((out / "run_state.json").read_text())["reason"] == "setting up", ranks[0],
                 what="set-up past the lease", timeout=120)
        ranks[1].send_signal(signal.SIGSTOP)
        time.sleep(3)
        assert ranks[0].poll() is None and n_steps(out) == 0
        t0 = time.time()
        ranks[0].send_signal(signal.SIGTERM)
        code, _, stderr = finish(ranks[0], timeout=60)
        print(f"rank 0 ended {time.time() - t0:.1f}s after SIGTERM")
        assert code == 128 + signal.SIGTERM and time.time() - t0 < 30, stderr[-2000:]
    finally:
        for proc in ranks:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "during set-up" in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert decision(out)[:2] == ["STOPPED", "resume"]
    assert json.loads((out / "run_state.json").read_text())["reason"] == "signal SIGTERM during set-up"
    assert not (out / "LEASE").exists()
    run_train(out, demo_data, *STEPS, nproc=2)
    assert status_word(out) == "COMPLETED"
    assert losses(out) == reference2
