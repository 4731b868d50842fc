"""Launching the real train.py (or torchrun train.py) in a subprocess and reading what the run leaves behind,
as an orchestrator would: run_state.json, metrics.jsonl, events.jsonl, checkpoints/.

Runs start in sessions of their own, so that a signal reaches the run and not the benchmark; TrainRun.kill ends
a run and its torchrun workers by pid. Scratch folders are removed when the benchmark process exits
(GPT_SIMPLE_BENCH_KEEP=1 keeps them, to read a failed run's log).
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
BENCH_CONFIG = ROOT / "configs" / "bench.toml"
TRAIN = ROOT / "train.py"
POLL_S = 0.005
_SCRATCH: list[Path] = []


def bench_env(threads: int | None) -> dict:
    """The environment of a benchmark's child: no deadline from the caller's job, unbuffered, `threads` OpenMP
    threads."""
    env = dict(os.environ)
    env.pop("GPT_SIMPLE_MAX_RUNTIME", None)
    env.pop("SLURM_JOB_END_TIME", None)
    env["PYTHONUNBUFFERED"] = "1"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def scratch_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f"gpt-simple-bench-{prefix}-"))
    _SCRATCH.append(path)
    return path


@atexit.register
def _remove_scratch() -> None:
    if os.environ.get("GPT_SIMPLE_BENCH_KEEP") != "1":
        for path in _SCRATCH:
            shutil.rmtree(path, ignore_errors=True)


def read_jsonl(path: Path) -> list[dict]:
    try:
        text = Path(path).read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line being written right now
    return out


def children(pid: int) -> list[int]:
    found = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return found


class TrainRun:
    """One launch of the real train.py (or torchrun train.py), observed from outside. (`script`: another entry
    that takes train.py's arguments, bench/gate.py.)

    Its console goes to OUT.log beside the output folder. Timestamps are epoch seconds (time.time()).
    """

    def __init__(self, out: Path, overrides: list[str] = (), nproc: int = 1, config: Path = BENCH_CONFIG,
                 threads: int | None = None, name: str = "run", script: Path = TRAIN, args: list[str] = (),
                 env: dict | None = None):
        self.out, self.nproc, self.name = Path(out), nproc, name
        self.log_path = self.out.parent / f"{self.out.name}.log"
        base = [PY, str(script), *args] if nproc == 1 else \
            [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script), *args]
        self.cmd = base + ["--config", str(config), "--training.output_dir", str(self.out), *overrides]
        self.threads = threads if threads is not None else max(1, (os.cpu_count() or 1) // nproc)
        self.extra_env = dict(env or {})  # on top of bench_env (e.g. a drill)
        self.proc: subprocess.Popen | None = None
        self.launched_at = None
        self._log = None

    def start(self) -> "TrainRun":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.launched_at = time.time()
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env={**bench_env(self.threads), **self.extra_env},
                                     stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    # -- reading the run's files --------------------------------------------------------------------------
    def metrics(self) -> list[dict]:
        """The training steps' records (evaluation records, "type": "eval", left out)."""
        return [r for r in read_jsonl(self.out / "metrics.jsonl") if "type" not in r]

    def events(self) -> list[dict]:
        return read_jsonl(self.out / "events.jsonl")

    def state(self) -> dict | None:
        try:
            return json.loads((self.out / "run_state.json").read_text())
        except (OSError, ValueError):
            return None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _check_alive(self, what: str) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.name}: train.py exited ({self.proc.returncode}) while waiting for {what}; "
                               f"command: {' '.join(self.cmd)}\n{self.log_tail()}")

    def wait_running(self, timeout: float = 300) -> float:
        """Epoch time at which the training loop started (run_state: RUNNING / 'training'): the first step."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.state()
            if s and s.get("status") == "RUNNING" and s.get("reason") == "training" \
                    and s.get("started_at", 0) >= self.launched_at - 1:
                return float(s["updated_at"])
            self._check_alive("the first step")
            time.sleep(POLL_S)
        raise TimeoutError(f"{self.name}: no first step within {timeout}s\n{self.log_tail()}")

    def wait_step(self, step: int, timeout: float = 600) -> dict:
        """Block until metrics.jsonl has a record for `step` (log_steps = 1); returns it."""
        path, deadline, size = self.out / "metrics.jsonl", time.time() + timeout, -1
        while time.time() < deadline:
            try:
                new = path.stat().st_size
            except FileNotFoundError:
                new = -1
            if new != size:
                size = new
                for rec in self.metrics():
                    if rec.get("step") == step:
                        return rec
            self._check_alive(f"step {step}")
            time.sleep(POLL_S)
        raise TimeoutError(f"{self.name}: step {step} not logged within {timeout}s\n{self.log_tail()}")

    def finish(self, timeout: float = 900) -> "TrainRun":
        """Wait for the run to end on its own; raise with its log unless it exited 0."""
        code = self.wait_exit(timeout)
        if code != 0:
            raise RuntimeError(f"{self.name}: train.py exited {code}; command: {' '.join(self.cmd)}\n"
                               f"{self.log_tail()}")
        return self

    # -- signals --------------------------------------------------------------------------------------------
    def worker_pids(self) -> list[int]:
        """The processes that train: train.py itself, or torchrun's workers."""
        return [self.proc.pid] if self.nproc == 1 else children(self.proc.pid)

    def signal(self, sig: int) -> None:
        for pid in self.worker_pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def wait_exit(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._close_log()

    def kill(self) -> None:
        """Hard stop of the whole job (after the measured part; the output dir is scratch). torchrun starts its
        workers in sessions of their own, so they are killed by pid, not through the agent's group."""
        if self.proc is not None and self.proc.poll() is None:
            workers = self.worker_pids() if self.nproc > 1 else []
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for pid in workers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
