"""One live job per run: an exclusive lease on output_dir, taken by rank 0 before the launch writes anything.

Works on shared filesystems where advisory locks are unreliable (NFS, Lustre): the lease is a file
(`output_dir/LEASE`) created with O_CREAT|O_EXCL, which is atomic on NFSv3+ and Lustre. It records its holder
{host, pid, job, started_at, heartbeat_at}; the holder refreshes heartbeat_at (atomic replace) with the run's
heartbeat and removes the file when the launch ends.

A lease whose holder is gone is taken over: at once when the holder is on this host and its pid is gone,
otherwise when its heartbeat is older than the stale limit `status.py` uses for CRASHED (the run state's
stale_after_s, at least MIN_STALE_S). The take-over is race-free: a taker first creates `.LEASE.takeover`
(O_EXCL: one taker at a time), then reads the lease again and, if it is still the stale one it judged, replaces it
with its own in one atomic rename. The lease file never disappears in between, so no launch's O_EXCL create can
slip in beside the taker (moving the stale file aside first left such a gap: two holders, found by
tests/unit/test_lease.py's race of real processes). A takeover file left by a taker that died (older than
TAKEOVER_STALE_S; a take-over takes milliseconds) is removed by the next taker. Import-light (no torch): status.py
reads it.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

from gpt_simple.fileio import create_durable, write_json_atomic
from gpt_simple.run_dir import RunDir
from gpt_simple.run_state import MIN_STALE_S, SETUP_STALE_S, _pid_alive

EXIT_HELD = 75  # EX_TEMPFAIL: another live job holds this run; this launch wrote nothing
TAKEOVER_STALE_S = 30.0


class LeaseHeld(Exception):
    """Another live job holds the run. str() is the one line naming the holder."""

    def __init__(self, holder: dict, path: Path):
        self.holder, self.path = holder, path
        super().__init__(f"another job holds this run: {describe(holder)} ({path}); this launch writes nothing "
                         f"and exits {EXIT_HELD}")


def job_id(environ=os.environ) -> str | None:
    """The scheduler's name for this job where known: SLURM_JOB_ID, a Kubernetes pod's name, else None."""
    if environ.get("SLURM_JOB_ID"):
        return f"slurm:{environ['SLURM_JOB_ID']}"
    if environ.get("KUBERNETES_SERVICE_HOST"):
        return f"k8s-pod:{environ.get('HOSTNAME') or socket.gethostname()}"
    return None


def describe(holder: dict, now: float | None = None) -> str:
    now = time.time() if now is None else now
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started_at") or 0)))
    beat = now - float(holder.get("heartbeat_at") or 0)
    job = f", job {holder['job']}" if holder.get("job") else ""
    return (f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {since}, "
            f"last heartbeat {max(0, beat):.0f}s ago")


def lease_path(output_dir: str | Path) -> Path:
    return RunDir(output_dir).lease


def read_holder(path: Path) -> dict | None:
    """The holder recorded in a lease file; None when there is none. A torn or empty file (a holder killed
    between create and write) reads as a holder with no heartbeat other than the file's mtime."""
    try:
        text = path.read_text()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
        if not isinstance(holder, dict):
            raise ValueError
    except ValueError:
        holder = {"host": None, "pid": None, "job": None, "started_at": mtime, "heartbeat_at": mtime}
    return holder


def stale_limit(output_dir: Path) -> float:
    """The limit status.py applies to the run's heartbeat (stale_after_s in run_state.json, else the set-up
    limit), never below MIN_STALE_S."""
    try:
        state = json.loads(RunDir(output_dir).state.read_text())
        limit = float(state.get("stale_after_s") or SETUP_STALE_S)
    except (OSError, ValueError, AttributeError, TypeError):
        limit = SETUP_STALE_S
    return max(MIN_STALE_S, limit)


def holder_gone(holder: dict, output_dir: Path, now: float | None = None, host: str | None = None) -> str | None:
    """Why the holder is gone (the lease may be taken over), or None while it is to be presumed alive."""
    now = time.time() if now is None else now
    host = socket.gethostname() if host is None else host
    if holder.get("host") == host and holder.get("pid") and not _pid_alive(int(holder["pid"])):
        return f"process {holder['pid']} on {host} is gone"
    age = now - float(holder.get("heartbeat_at") or 0)
    limit = stale_limit(output_dir)
    if age > limit:
        return f"heartbeat stale for {age:.0f}s (limit {limit:.0f}s)"
    return None


def live_holder(output_dir: str | Path, now: float | None = None) -> dict | None:
    """The holder of a live lease on output_dir, or None (no lease, or a stale one). For status.py."""
    holder = read_holder(lease_path(output_dir))
    if holder is None or holder_gone(holder, Path(output_dir), now) is not None:
        return None
    return holder


def _remove_if_stale(lock: Path) -> None:
    """A takeover file whose taker died holding it (take-overs take milliseconds) would block every later one."""
    try:
        if time.time() - lock.stat().st_mtime > TAKEOVER_STALE_S:
            lock.unlink(missing_ok=True)
    except FileNotFoundError:
        pass


class Lease:
    """This launch's lease on output_dir. acquire() or LeaseHeld; refresh() with each heartbeat; release()."""

    def __init__(self, output_dir: str | Path, environ=os.environ):
        self.output_dir = Path(output_dir)
        self.path = lease_path(output_dir)
        now = time.time()
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "job": job_id(environ),
                       "token": uuid.uuid4().hex, "started_at": now, "heartbeat_at": now}
        self.held = False
        self.taken_over: dict | None = None  # the stale holder this launch replaced, with why
        self.lost_races = 0  # take-overs this launch found another taker at (or done) before it

    def _create(self) -> bool:
        try:
            create_durable(self.path, json.dumps(self.holder) + "\n")  # O_CREAT | O_EXCL
        except FileExistsError:
            return False
        return True

    def acquire(self, attempts: int = 50) -> "Lease":
        for _ in range(attempts):
            if self._create():
                self.held = True
                return self
            holder = read_holder(self.path)
            if holder is None:
                continue  # released between our create and our read: try again
            why = holder_gone(holder, self.output_dir)
            if why is None:
                raise LeaseHeld(holder, self.path)
            if self._take_over(holder):
                self.held, self.taken_over = True, {**holder, "why": why}
                return self
            time.sleep(0.01)  # another taker is at it: its lease, once written, is live and refuses this one
        holder = read_holder(self.path) or {}
        raise LeaseHeld(holder, self.path)

    def _take_over(self, stale: dict) -> bool:
        """Replace the stale lease by this one, if this launch gets the takeover file and the lease is still the
        stale one it judged. False when another taker is at it or has been (self.lost_races counts it)."""
        lock = self.path.with_name(".LEASE.takeover")
        try:
            create_durable(lock, self.holder["token"] + "\n")
        except FileExistsError:
            self.lost_races += 1
            _remove_if_stale(lock)
            return False
        try:
            current = read_holder(self.path)
            if current is None or current.get("token") != stale.get("token") or \
                    current.get("heartbeat_at") != stale.get("heartbeat_at"):
                self.lost_races += 1  # replaced (or refreshed) since this launch judged it stale
                return False
            write_json_atomic(self.path, self.holder)  # one rename: the lease file is never missing
            return True
        finally:
            lock.unlink(missing_ok=True)

    def refresh(self) -> None:
        """With the run's heartbeat. If the lease is no longer ours (taken over after we looked stale), say so
        by raising LeaseHeld: two jobs must not keep writing the run."""
        if not self.held:
            return
        current = read_holder(self.path)
        if current is None or current.get("token") != self.holder["token"]:
            self.held = False
            raise LeaseHeld(current or {}, self.path)
        self.holder["heartbeat_at"] = time.time()
        write_json_atomic(self.path, self.holder)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        current = read_holder(self.path)
        if current is not None and current.get("token") == self.holder["token"]:
            self.path.unlink(missing_ok=True)
