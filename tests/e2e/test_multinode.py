"""Multi-node launches on this machine: two torchrun agents meet in a c10d rendezvous on localhost as two
"nodes" would (`--nnodes 2`). A time limit (SIGTERM to both agents, as SLURM sends it) ends in a shutdown
checkpoint and STOPPED; a lost node (SIGKILLed, or hung with SIGSTOP) ends the other node's worker within the
collective timeout, as a resumable transient failure. Either way one node with 2 processes then finishes the
run with exactly the losses of a 2-rank run that never stopped. With parallel.replicate_degree = 'auto', two
nodes of 2 processes train on a 2x2 mesh whose shard groups are the nodes."""
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from gpt_simple.checkpoint import list_committed
from helpers.paths import PYTHON, ROOT
from helpers.shared import shared_run
from helpers.train import TINY, TORCHRUN, child_env, events, finish, losses, run_train, status_word

pytestmark = pytest.mark.slow

# save_steps 2, synchronous: the lost node's run has committed checkpoints to fall back to, none in flight.
# No evaluation: it is not what is tested.
ARGS = ("--training.max_steps", "40", "--training.save_steps", "2", "--training.keep_last_k", "0",
        "--training.async_save", "false", "--training.peak_flops", "1e12",
        "--eval.every_steps", "0", "--eval.at_end", "false", "--training.collective_timeout_seconds", "10")
# A survivor of a lost peer must be gone by then. A gloo send to a peer that died can wait for the collective
# timeout although the socket closed (seen: rank 0 blocked in an all-gather's waitSend), and a hung peer is
# only ever noticed by that timeout: the bound is the timeout plus the exit.
SURVIVOR_BOUND_S = 120


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, demo_data) -> Path:
    """One 2-rank launch on one node from step 0 to the end: what the interrupted runs must reproduce (once per
    session)."""
    return shared_run(tmp_path_factory, "multinode-uninterrupted",
                      lambda out: run_train(out, demo_data, *ARGS, nproc=2))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_nodes(out: Path, data: Path, *more: str, nproc: int = 1) -> list[subprocess.Popen]:
    """Two torchrun agents as two nodes, each in a session of its own."""
    port, run_id = free_port(), uuid.uuid4().hex[:8]
    cmd = [TORCHRUN, "--nnodes", "2", "--nproc_per_node", str(nproc), "--rdzv_backend", "c10d",
           "--rdzv_endpoint", f"localhost:{port}", "--rdzv_id", run_id, "--max_restarts", "0",
           "--signals_to_handle", "SIGTERM,SIGINT,SIGUSR1,SIGUSR2", str(ROOT / "train.py"),
           *TINY, "--data.dir", str(data), "--data.demo", "false", "--training.output_dir", str(out), *ARGS, *more]
    return [subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True) for _ in range(2)]


def logged_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except json.JSONDecodeError:  # a line being written
        return 0


def wait_for_step(out: Path, nodes: list[subprocess.Popen], step: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while logged_step(out) < step:
        if any(n.poll() is not None for n in nodes) or time.time() > deadline:
            for n in nodes:
                kill_node(n)
            raise AssertionError(f"step {step} not reached: " + "\n".join(n.stderr.read()[-2000:] for n in nodes))
        time.sleep(0.01)


def workers(agent: subprocess.Popen) -> list[int]:
    """The agent's worker processes. torchrun starts each in a session of its own, so a signal to the agent's
    process group does not reach them: a node's processes are the agent's group and each worker's."""
    path = Path(f"/proc/{agent.pid}/task/{agent.pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def signal_node(agent: subprocess.Popen, sig: int) -> None:
    for group in [agent.pid, *workers(agent)]:
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            pass


def kill_node(agent: subprocess.Popen) -> None:
    """What a machine's death does to its processes: all of them end at once, without a word."""
    signal_node(agent, signal.SIGKILL)
    agent.wait()


def freeze(nodes: list[subprocess.Popen], sig: int) -> None:
    """SIGSTOP / SIGCONT every process of the nodes: the stop lands within a step of where the test saw it."""
    for n in nodes:
        signal_node(n, sig)


def worker_ranks(agent: subprocess.Popen) -> list[int]:
    """The global ranks torchrun gave this node's workers (their RANK)."""
    ranks = []
    for pid in workers(agent):
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if item.startswith(b"RANK="):
                ranks.append(int(item[5:]))
    return sorted(ranks)


def worker_rank(agent: subprocess.Popen) -> int:
    [rank] = worker_ranks(agent)
    return rank


def committed(out: Path) -> list[str]:
    return [c.name for c in list_committed(out / "checkpoints")]


def decision(out: Path) -> list[str]:
    proc = subprocess.run([PYTHON, str(ROOT / "status.py"), str(out), "--decision"], capture_output=True,
                          text=True, timeout=60)
    return proc.stdout.rstrip("\n").split("\t")


def test_time_limit_on_two_nodes_then_one_node_resumes_exact(tmp_path, demo_data, uninterrupted):
    out = tmp_path / "run"
    nodes = start_nodes(out, demo_data, "--training.save_steps", "0")  # the stop's own save is the only one
    wait_for_step(out, nodes, 3)
    freeze(nodes, signal.SIGSTOP)
    for n in nodes:  # SLURM signals every task of the step at its time limit: here each node's agent
        n.send_signal(signal.SIGTERM)
    freeze(nodes, signal.SIGCONT)
    results = [finish(n, timeout=120) for n in nodes]
    # torchrun itself exits 1 after a signal it forwarded, whatever its workers did: the status says what happened
    assert all("Received 15 death signal" in err for _, _, err in results)
    assert "STOPPED: signal SIGTERM" in "".join(o for _, o, _ in results)

    stopped_at = events(out)[-1]
    assert stopped_at["event"] == "stop" and "SIGTERM" in stopped_at["reason"]
    step = stopped_at["step"]
    assert 3 <= step < 40 and committed(out)[-1] == f"step-{step}-shutdown"
    assert status_word(out) == "STOPPED" and decision(out)[:2] == ["STOPPED", "resume"]
    assert [e["world_size"] for e in events(out) if e["event"] == "launch"] == [2]

    run_train(out, demo_data, *ARGS, nproc=2)  # one node, two processes
    assert status_word(out) == "COMPLETED"
    assert [e["checkpoint"] for e in events(out) if e["event"] == "resume"] == [f"step-{step}-shutdown"]
    assert losses(out) == losses(uninterrupted)


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_lost_node_ends_the_other_and_the_run_resumes(tmp_path, demo_data, uninterrupted, how):
    """The node that does not hold rank 0 is lost: SIGKILLed (a machine that died: its sockets close) or
    SIGSTOPped (a machine that hangs or drops off the network: its sockets stay open, nothing answers). Rank 0
    exits within the bound (a hung peer: after training.collective_timeout_seconds) as a resumable transient
    failure, and the next launch resumes from the last committed checkpoint with the uninterrupted losses.
    (Losing rank 0's node leaves no one to record the failure: the run then reads CRASHED, which the templates
    hand to a person.)"""
    out = tmp_path / "run"
    nodes = start_nodes(out, demo_data)
    wait_for_step(out, nodes, 5)
    freeze(nodes, signal.SIGSTOP)
    lost = next(n for n in nodes if worker_rank(n) != 0)
    survivor = next(n for n in nodes if n is not lost)
    [rank0] = workers(survivor)
    if how == "killed":
        kill_node(lost)
    freeze([survivor], signal.SIGCONT)
    try:
        deadline = time.time() + SURVIVOR_BOUND_S
        while not gone(rank0) and time.time() < deadline:
            time.sleep(0.1)
        assert gone(rank0), f"rank 0 still running {SURVIVOR_BOUND_S}s after its peer was {how}"
        if how == "killed":  # its agent follows (a hung peer's agent can keep torchrun's waiting on its store)
            finish(survivor, timeout=SURVIVOR_BOUND_S)
    finally:
        for n in nodes:
            kill_node(n)

    word, action, reason = decision(out)
    assert (word, action) == ("STOPPED", "resume") and reason.startswith("transient: "), reason
    last = committed(out)[-1]
    assert not last.endswith("-final")

    run_train(out, demo_data, *ARGS, nproc=2)
    assert status_word(out) == "COMPLETED"
    assert [e["checkpoint"] for e in events(out) if e["event"] == "resume"] == [last]
    assert losses(out) == losses(uninterrupted)


def test_auto_replicate_degree_is_one_replica_per_node(tmp_path, demo_data):
    """Two nodes of 2 processes with parallel.replicate_degree = 'auto': a 2x2 mesh (HSDP), trained to the end."""
    out = tmp_path / "run"
    nodes = start_nodes(out, demo_data, "--parallel.replicate_degree", "auto", "--training.max_steps", "3",
                        "--training.micro_batch_size", "2", nproc=2)
    deadline = time.time() + 120
    while not all(len(worker_ranks(n)) == 2 for n in nodes) and time.time() < deadline:
        time.sleep(0.05)
    # the shard groups of a 2x2 mesh are ranks 0-1 and 2-3: each must be one node's processes
    assert sorted(worker_ranks(n) for n in nodes) == [[0, 1], [2, 3]]
    results = [finish(n, timeout=180) for n in nodes]
    assert [code for code, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    assert "world size 4 (gloo, cpu), mesh 2x2 (replicate x shard; HSDP)" in "".join(o for _, o, _ in results)
    assert status_word(out) == "COMPLETED"
    assert [e["mesh"] for e in events(out) if e["event"] == "launch"] == [[2, 2]]
