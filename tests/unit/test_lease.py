"""The lease on a run folder (gpt_simple/lease.py) and the trainer's failure classes: no subprocesses."""
import json
import os
import socket
import time

import pytest

from gpt_simple import lease as L
from gpt_simple.run_state import MIN_STALE_S


def write_lease(out, **fields):
    holder = {"host": "elsewhere", "pid": 12345, "job": "slurm:99", "token": "t", "started_at": time.time() - 60,
              "heartbeat_at": time.time(), **fields}
    (out / "LEASE").write_text(json.dumps(holder))
    return holder


def test_acquire_refuse_release(tmp_path):
    a = L.Lease(tmp_path).acquire()
    with pytest.raises(L.LeaseHeld) as e:
        L.Lease(tmp_path).acquire()
    assert f"pid {os.getpid()} on {socket.gethostname()}" in str(e.value)
    a.refresh()
    assert L.live_holder(tmp_path)["token"] == a.holder["token"]
    a.release()
    assert not (tmp_path / "LEASE").exists()
    L.Lease(tmp_path).acquire().release()


def test_other_host_respected_until_stale(tmp_path):
    write_lease(tmp_path)
    with pytest.raises(L.LeaseHeld) as e:
        L.Lease(tmp_path).acquire()
    assert "pid 12345 on elsewhere, job slurm:99" in str(e.value)
    write_lease(tmp_path, heartbeat_at=time.time() - MIN_STALE_S + 5)  # not yet stale (no run state: set-up limit)
    with pytest.raises(L.LeaseHeld):
        L.Lease(tmp_path).acquire()
    (tmp_path / "run_state.json").write_text(json.dumps({"status": "RUNNING", "stale_after_s": 10}))
    write_lease(tmp_path, heartbeat_at=time.time() - MIN_STALE_S - 5)  # older than the limit status.py uses
    taker = L.Lease(tmp_path).acquire()
    assert taker.taken_over["pid"] == 12345 and "stale" in taker.taken_over["why"]
    assert L.live_holder(tmp_path)["token"] == taker.holder["token"]


def test_dead_pid_on_this_host_taken_over_at_once(tmp_path):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    write_lease(tmp_path, host=socket.gethostname(), pid=pid)
    taker = L.Lease(tmp_path).acquire()
    assert "is gone" in taker.taken_over["why"]


def test_torn_lease_file_uses_mtime(tmp_path):
    (tmp_path / "LEASE").write_text("")
    with pytest.raises(L.LeaseHeld):  # fresh mtime: presumed alive
        L.Lease(tmp_path).acquire()
    old = time.time() - 10_000
    os.utime(tmp_path / "LEASE", (old, old))
    L.Lease(tmp_path).acquire()


def test_takeover_race_one_wins(tmp_path):
    """Two takers of one stale lease: the one that finds the stale lease replaced since it judged it does not
    replace the winner's (replayed by hand: b judged the lease stale before a took it over)."""
    write_lease(tmp_path, heartbeat_at=0)
    a, b = L.Lease(tmp_path), L.Lease(tmp_path)
    stale = L.read_holder(tmp_path / "LEASE")
    a.acquire()
    assert a.taken_over["token"] == stale["token"]
    assert b._take_over(stale) is False and b.lost_races == 1
    with pytest.raises(L.LeaseHeld):
        b.acquire()
    a.refresh()  # still a's


def test_a_takeover_file_left_by_a_dead_taker_is_removed_once_stale(tmp_path):
    write_lease(tmp_path, heartbeat_at=0)
    lock = tmp_path / ".LEASE.takeover"
    lock.write_text("dead\n")
    with pytest.raises(L.LeaseHeld):  # a taker may be at it: not taken over yet
        L.Lease(tmp_path).acquire(attempts=3)
    old = time.time() - L.TAKEOVER_STALE_S - 1
    os.utime(lock, (old, old))
    lease = L.Lease(tmp_path).acquire()
    assert lease.taken_over is not None and not lock.exists()


# One taker: waits for the start file, acquires, reports (won, lost_races, token) as a JSON line, and stays alive
# until the test is done with the trial.
TAKER = """
import json, os, sys, time
from gpt_simple import lease as L
out, go = sys.argv[1], sys.argv[2]
while not os.path.exists(go):
    time.sleep(0.0005)
lease = L.Lease(out)
try:
    lease.acquire()
    won = True
except L.LeaseHeld:
    won = False
print(json.dumps({"won": won, "lost_races": lease.lost_races, "token": lease.holder["token"]}), flush=True)
while not os.path.exists(go + ".end"):  # alive until every taker is done: a dead winner's lease is stale at once
    time.sleep(0.001)
"""


def test_concurrent_takers_of_a_stale_lease_one_wins(tmp_path):
    """Real processes race to take over one stale lease, 20 trials of 4: every trial has exactly one winner whose
    lease is the file's, and nothing is left behind; and the races are real: takers did find another at it (the
    branch a one-process test can only replay by hand). The protocol this replaced (move the stale file aside,
    then create) let a plain create slip into the gap: two winners, within a few trials."""
    import subprocess
    import sys
    lost = 0
    for trial in range(20):
        out = tmp_path / f"t{trial}"
        out.mkdir()
        write_lease(out, heartbeat_at=0)
        go = out / "go"
        takers = [subprocess.Popen([sys.executable, "-c", TAKER, str(out), str(go)], stdout=subprocess.PIPE,
                                   text=True) for _ in range(4)]
        time.sleep(0.2)  # every taker is waiting on the start file
        go.touch()
        results = [json.loads(p.stdout.readline()) for p in takers]
        (out / "go.end").touch()
        assert all(p.wait(timeout=60) == 0 for p in takers)
        winners = [r for r in results if r["won"]]
        assert len(winners) == 1, results
        assert L.read_holder(out / "LEASE")["token"] == winners[0]["token"]
        assert sorted(p.name for p in out.iterdir()) == ["LEASE", "go", "go.end"]
        lost += sum(r["lost_races"] for r in results)
    assert lost > 0, "no taker found another at the take-over in 20 trials of 4 processes"


def test_refresh_detects_loss(tmp_path):
    a = L.Lease(tmp_path).acquire()
    write_lease(tmp_path)  # someone else's now
    with pytest.raises(L.LeaseHeld):
        a.refresh()
    a.release()  # does not remove the other's lease
    assert (tmp_path / "LEASE").exists()


def test_job_id():
    assert L.job_id({"SLURM_JOB_ID": "7"}) == "slurm:7"
    assert L.job_id({"KUBERNETES_SERVICE_HOST": "x", "HOSTNAME": "pod-a"}) == "k8s-pod:pod-a"
    assert L.job_id({}) is None


def test_decision_held(tmp_path):
    from gpt_simple.status_report import decision
    write_lease(tmp_path)
    word, action, reason = decision(tmp_path)
    assert (word, action) == ("NONE", "held") and "elsewhere" in reason
    write_lease(tmp_path, heartbeat_at=0)
    assert decision(tmp_path)[1] == "start"


def test_transient_classification():
    import torch.distributed as dist

    from gpt_simple.config import ConfigError
    from gpt_simple.launch import SetupFailed, is_transient
    assert is_transient(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [1.2.3.4]:1"))
    assert is_transient(RuntimeError("Gloo connectFullMesh failed with ... Connection refused"))
    assert is_transient(dist.DistNetworkError("Connection reset by peer"))
    assert is_transient(SetupFailed("x"))
    assert is_transient(ConnectionResetError(104, "Connection reset by peer"))
    assert not is_transient(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_transient(ConfigError("bad"))
    assert not is_transient(ValueError("timed out"))


def test_transient_cap(tmp_path):
    from gpt_simple.journal import Journal
    from gpt_simple.run_state import ERROR, STOPPED
    from gpt_simple.launch import TRANSIENT_CAP, _record_transient
    for i in range(TRANSIENT_CAP):
        rs = Journal(tmp_path)
        _record_transient(rs, "peer lost", 5)
        assert rs.state.state["status"] == STOPPED and rs.state.state["reason"].startswith("transient: ")
    rs = Journal(tmp_path)
    _record_transient(rs, "peer lost", 5)
    assert rs.state.state["status"] == ERROR and rs.state.state["transient_failures"] == TRANSIENT_CAP + 1
    rs = Journal(tmp_path)
    _record_transient(rs, "peer lost", 6)  # progress resets the count
    assert rs.state.state["status"] == STOPPED and rs.state.state["transient_failures"] == 1
