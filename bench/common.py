"""Shared pieces of the benchmarks: launching the real train.py, reading what a run leaves behind, freezing a
run between steps (lockstep), the matmul ceiling, rows and the table.

Every benchmark returns rows {"metric", "ours", "baseline", "ratio", "target", ...} where the baseline is
measured in the same run of the benchmark, interleaved with ours, because this machine is shared and its
speed changes by up to 10x from one minute to the next.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import statistics
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


# -- statistics and rows ---------------------------------------------------------------------------------------
def median(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else float("nan")


def spread(xs) -> str:
    """'min..max over n' of a sample, for the notes."""
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return "no samples"
    return f"{_num(min(xs))}..{_num(max(xs))} over {len(xs)}"


def check_target(ratio, target: str):
    """True/False for '≥ 0.95', '<= 1%', '≤ 1.2x'; None for 'report' or when it cannot be judged."""
    if ratio is None or (isinstance(ratio, float) and math.isnan(ratio)):
        return None
    m = re.match(r"\s*(>=|≥|<=|≤|>|<)\s*([0-9.]+)\s*(%|x|×)?\s*$", str(target))
    if not m:
        return None
    op, value, unit = m.groups()
    bound = float(value) / (100.0 if unit == "%" else 1.0)
    return ratio >= bound if op in (">=", "≥", ">") else ratio <= bound


def row(metric: str, ours, baseline, ratio, target: str, unit: str = "", note: str = "", **extra) -> dict:
    return {"metric": metric, "ours": ours, "baseline": baseline, "ratio": ratio, "target": target,
            "ok": check_target(ratio, target), "unit": unit, "note": note, **extra}


def _num(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    a = abs(x)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.3g}" if a < 10 else f"{x:.1f}"
    if a >= 1e-3:
        return f"{x:.4f}".rstrip("0")
    return f"{x:.2e}"


def _ratio(x, target: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if "%" in str(target):
        return f"{x * 100:.3g}%"
    return f"{x:.3f}"


def format_table(rows: list[dict]) -> str:
    header = ("metric", "ours", "baseline", "ratio", "target", "ok")
    body = []
    for r in rows:
        unit = r.get("unit") or ""
        ok = r.get("ok", check_target(r.get("ratio"), r.get("target", "")))
        body.append((r["metric"], f"{_num(r.get('ours'))} {unit}".strip() if unit and r.get("ours") is not None
                     else _num(r.get("ours")),
                     f"{_num(r.get('baseline'))} {r.get('baseline_unit', unit)}".strip()
                     if r.get("baseline") is not None and (r.get("baseline_unit") or unit) else _num(r.get("baseline")),
                     _ratio(r.get("ratio"), r.get("target", "")), str(r.get("target", "")),
                     {True: "yes", False: "MISSED", None: "-"}[ok]))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(b) for b in body]
    notes = [f"  {r['metric']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(out + (["", "notes:"] + notes if notes else []))


def write_json(path: str | Path, rows: list[dict], **meta) -> None:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    Path(path).write_text(json.dumps(clean({"rows": rows, **meta}), indent=1) + "\n")


def machine() -> dict:
    import platform
    import torch
    model = ""
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                model = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host": platform.node(), "cpu": model, "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "loadavg_at_start": os.getloadavg()}


def exit_cleanly_on_termination() -> None:
    """SIGTERM / SIGHUP end a benchmark through SystemExit, so that its `finally` blocks kill the runs it
    started: by default they would outlive it, some frozen mid-step by the lockstep harness."""
    def leave(signum, frame):
        raise SystemExit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, leave)


def main_for(run, description: str, argv: list[str] | None = None) -> int:
    """The `python bench/X.py [--quick] [--json PATH]` entry shared by every benchmark."""
    import argparse
    exit_cleanly_on_termination()
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="fewer repetitions: about a third of the time")
    p.add_argument("--json", help="also write the rows to this file")
    a = p.parse_args(argv)
    started = time.time()
    rows = run(quick=a.quick)
    print(format_table(rows))
    print(f"\n({time.time() - started:.0f}s; load average now {os.getloadavg()[0]:.1f})")
    if a.json:
        write_json(a.json, rows, machine=machine())
    return 0


# -- train.py in a subprocess ---------------------------------------------------------------------------------
def bench_env(threads: int | None) -> dict:
    env = dict(os.environ)
    env.pop("GPT_SIMPLE_MAX_RUNTIME", None)
    env.pop("SLURM_JOB_END_TIME", None)
    env["PYTHONUNBUFFERED"] = "1"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def scratch_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"gpt-simple-bench-{prefix}-"))


class TrainRun:
    """One launch of the real train.py (or torchrun train.py) on configs/bench.toml, observed from outside.

    Its console goes to OUT.log; the run's own files (metrics.jsonl, events.jsonl, run_state.json,
    checkpoints/) are read as an orchestrator would. Timestamps are epoch seconds (time.time()).
    """

    def __init__(self, out: Path, overrides: list[str] = (), nproc: int = 1, config: Path = BENCH_CONFIG,
                 threads: int | None = None, name: str = "run"):
        self.out, self.nproc, self.name = Path(out), nproc, name
        self.log_path = self.out.parent / f"{self.out.name}.log"
        base = [PY, str(TRAIN)] if nproc == 1 else \
            [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(TRAIN)]
        self.cmd = base + ["--config", str(config), "--training.output_dir", str(self.out), *overrides]
        self.threads = threads if threads is not None else max(1, (os.cpu_count() or 1) // nproc)
        self.proc: subprocess.Popen | None = None
        self.launched_at = None
        self._log = None

    def start(self) -> "TrainRun":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.launched_at = time.time()
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=bench_env(self.threads), stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    # -- reading the run's files --------------------------------------------------------------------------
    def metrics(self) -> list[dict]:
        return read_jsonl(self.out / "metrics.jsonl")

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

    # -- signals --------------------------------------------------------------------------------------------
    def worker_pids(self) -> list[int]:
        """The processes that train: train.py itself, or torchrun's workers."""
        if self.nproc == 1:
            return [self.proc.pid]
        return _children(self.proc.pid)

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
        """Hard stop of the whole job (used after the measured part; the output dir is scratch). torchrun starts
        its workers in sessions of their own, so they are killed by pid, not through the agent's group."""
        if self.proc is not None and self.proc.poll() is None:
            workers = self.worker_pids() if self.nproc > 1 else []
            try:
                os.killpg(self.proc.pid, signal.SIGCONT)
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for pid in workers:
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    try:
                        os.kill(pid, sig)
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


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return found


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


def step_tokens(overrides: list[str] = (), config: Path = BENCH_CONFIG) -> tuple[int, int]:
    """(tokens per optimizer step, flops per token) of the bench config with these overrides."""
    sys.path.insert(0, str(ROOT))
    from gpt_simple.config import load_config
    from gpt_simple.model import GPT, count_params, flops_per_token
    import torch
    cfg = load_config(config, list(overrides))
    with torch.device("meta"):
        model = GPT(cfg.model)
    n = count_params(model, cfg.model)
    return cfg.training.global_batch_size * cfg.data.seq_len, flops_per_token(cfg.model, n, cfg.data.seq_len)


# -- lockstep: freeze every participant but one ----------------------------------------------------------------
class FrozenTrain:
    """A train.py run advanced one optimizer step at a time and frozen (SIGSTOP) in between.

    train.py's own per-step tokens_per_s (log_steps = 1) is read from metrics.jsonl; the time the harness held
    the process frozen inside that step's window is subtracted. The process is frozen FREEZE_DELAY_S after
    its metrics line appears, i.e. inside the next step's window (the window restarts right after the line
    is written), so each window holds exactly one frozen interval.
    """
    FREEZE_DELAY_S = 0.02

    def __init__(self, run: TrainRun, tokens_per_step: int):
        self.run, self.tokens = run, tokens_per_step
        self.step = 0
        self.stopped_at: float | None = None
        self.samples: list[float] = []   # corrected seconds per step
        self.records: list[dict] = []

    def last_step(self) -> int:
        return max((rec.get("step", 0) for rec in self.run.metrics()), default=0)

    def ready(self, steps: int) -> bool:
        """Non-blocking warm-up: once `steps` steps are logged, freeze the run and return True."""
        if self.stopped_at is not None:
            return True
        self.run._check_alive(f"warm-up step {steps}")
        if self.last_step() < steps:
            return False
        time.sleep(self.FREEZE_DELAY_S)
        self.run.signal(signal.SIGSTOP)
        self.stopped_at = time.perf_counter()
        self.step = self.last_step()
        return True

    def advance(self, timeout: float = 600) -> float:
        resumed = time.perf_counter()
        frozen = resumed - self.stopped_at
        self.run.signal(signal.SIGCONT)
        rec = self.run.wait_step(self.step + 1, timeout)
        time.sleep(self.FREEZE_DELAY_S)
        self.run.signal(signal.SIGSTOP)
        self.stopped_at = time.perf_counter()
        self.step += 1
        window = self.tokens / rec["tokens_per_s"]
        seconds = window - frozen
        overshot = self.last_step() != self.step
        if overshot or seconds <= 0.2 * window:  # the freeze missed its window (should not happen): no sample
            self.step = self.last_step()
            seconds = float("nan")
        self.samples.append(seconds)
        self.records.append({**rec, "frozen_s": frozen, "seconds": seconds})
        return seconds

    def release(self) -> None:
        self.run.signal(signal.SIGCONT)


class GatedPlain:
    """bench/plain_loop.py --gate: does one step per line on its stdin and answers with a JSON line."""

    def __init__(self, overrides: list[str] = (), config: Path = BENCH_CONFIG, threads: int | None = None):
        self.proc = subprocess.Popen([PY, str(ROOT / "bench" / "plain_loop.py"), "--config", str(config), "--gate",
                                      *overrides], cwd=ROOT, env=bench_env(threads or os.cpu_count()),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.samples: list[float] = []

    def ready(self) -> None:
        line = self.proc.stdout.readline()
        if not line or not json.loads(line).get("ready"):
            raise RuntimeError(f"plain_loop.py did not start (exit {self.proc.poll()})")

    def one(self) -> dict:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"plain_loop.py exited ({self.proc.poll()})")
        return json.loads(line)

    def warm_up(self, steps: int) -> None:
        for _ in range(steps):
            self.one()

    def advance(self) -> float:
        seconds = self.one()["seconds"]
        self.samples.append(seconds)
        return seconds

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
