"""The run's status file, output_dir/run_state.json: the orchestrator's only input, and its readers.

Written atomically by rank 0 (tmp + rename), strict JSON, through the journal (gpt_simple/journal), which owns
every record a run writes. Readers infer CRASHED from a RUNNING file whose heartbeat is older than the writer's
own `stale_after_s` (the clock sizes it from its measured step and save times) or, on the same host, whose pid
is gone.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from gpt_simple.run_dir import RunDir, write_json_atomic

RUNNING, STOPPED, COMPLETED, HALTED, ERROR, CRASHED = "RUNNING", "STOPPED", "COMPLETED", "HALTED", "ERROR", "CRASHED"
STATUSES = (RUNNING, STOPPED, COMPLETED, HALTED, ERROR, CRASHED)
MIN_STALE_S = 120.0
SETUP_STALE_S = 900.0  # start-up (imports, model build, checkpoint load) writes few heartbeats


class StateFileError(ValueError):
    """run_state.json exists but cannot be read as a state."""


class RunState:
    """Rank 0's view of the run's state; every change goes to disk at once."""

    def __init__(self, output_dir: Path, enabled: bool = True):
        self.run_dir, self.enabled = RunDir(output_dir), enabled
        self.path = self.run_dir.state
        previous = read_state(output_dir) if enabled and self.path.exists() else None
        now = time.time()
        self.state = {
            "status": RUNNING, "reason": "starting", "step": 0, "max_steps": None, "tokens": 0,
            "last_checkpoint": previous.get("last_checkpoint") if previous else None,
            "started_at": now, "updated_at": now, "heartbeat_at": now, "stale_after_s": SETUP_STALE_S,
            "pid": os.getpid(), "host": socket.gethostname(),
            "launches": (previous.get("launches", 0) if previous else 0) + 1,
            "first_started_at": previous.get("first_started_at", now) if previous else now,
            "deadline_source": None, "deadline_at": None, "error": None,
            # transient failures in a row, and the step of the last one (progress past it resets the count)
            "transient_failures": previous.get("transient_failures", 0) if previous else 0,
            "transient_step": previous.get("transient_step") if previous else None,
            # launches in a row that reached their deadline without training a step (trainer.py: IDLE_CAP)
            "idle_launches": previous.get("idle_launches", 0) if previous else 0,
            # the clock's measured durations (gpt_simple/clock.py): the stop decision budgets with them from step 0
            "durations": previous_durations(previous),
        }
        self.previous_step = int(previous.get("step") or 0) if previous else 0
        self.previous_durations = dict(previous_durations(previous))  # as the previous launch left them
        # when the previous launch was last heard of (its last write): the queue gap before this one starts there
        self.previous_seen_at = float(previous.get("heartbeat_at") or 0) or None if previous else None
        self.lease = None  # gpt_simple.lease.Lease of this launch (rank 0): refreshed with every write

    def update(self, **fields) -> None:
        if not self.enabled:
            return
        now = time.time()
        if self.lease is not None:
            self.lease.refresh()  # LeaseHeld if another job took the run over: stop writing it
        self.state.update(fields, updated_at=now, heartbeat_at=now)
        write_json_atomic(self.path, self.state)


def previous_durations(previous: dict | None) -> dict:
    """The durations a state file carries; a file from before the clock carried save times as save_s."""
    if not previous:
        return {}
    if isinstance(previous.get("durations"), dict):
        return previous["durations"]
    old = previous.get("save_s") or {}
    return {f"save_{k}_s": v for k, v in old.items() if k in ("sync", "async") and v}


def read_state(output_dir: Path) -> dict:
    path = RunDir(output_dir).state
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise StateFileError(f"{path}: corrupt state file ({e})") from None
    if not isinstance(state, dict) or state.get("status") not in STATUSES:
        raise StateFileError(f"{path}: corrupt state file (no valid 'status')")
    return state


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Exited but not reaped: a torchrun worker whose agent was SIGKILLed is reparented to PID 1, and in some
    containers PID 1 never reaps, so the dead worker keeps its pid (kill(pid, 0) succeeds) for ever."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:  # no /proc (macOS), or gone meanwhile
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def effective_status(state: dict, now: float | None = None) -> tuple[str, str | None]:
    """(status, why) as an orchestrator should read it: RUNNING becomes CRASHED when the writer is gone."""
    if state["status"] != RUNNING:
        return state["status"], state.get("reason")
    now = time.time() if now is None else now
    age = now - float(state.get("heartbeat_at") or 0)
    if age > float(state.get("stale_after_s") or MIN_STALE_S):
        return CRASHED, f"heartbeat stale for {age:.0f}s (limit {state.get('stale_after_s'):.0f}s)"
    if state.get("host") == socket.gethostname() and state.get("pid") and not _pid_alive(int(state["pid"])):
        return CRASHED, f"process {state['pid']} on {state['host']} is gone"
    return RUNNING, state.get("reason")
