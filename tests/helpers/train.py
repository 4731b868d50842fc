"""Test helpers that run real train.py / torchrun / status.py subprocesses on the tiny config."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from helpers.paths import PYTHON, ROOT

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

# A model small enough that a subprocess run of a few steps takes seconds on one CPU core; MFU against a fixed
# peak: no CPU matmul ceiling measured at every launch (tests/e2e/test_train.py's test_run_directory measures it).
TINY_MODEL = ["--model.n_layer", "2", "--model.n_embd", "64", "--model.n_head", "2",
              "--data.seq_len", "64", "--model.block_size", "64",
              "--training.global_batch_size", "8", "--training.micro_batch_size", "4",
              "--training.peak_flops", "1e12"]
TINY = ["--config", str(ROOT / "configs" / "tiny.toml"), *TINY_MODEL,
        "--training.log_steps", "1", "--training.save_steps", "0",
        "--optimizer.warmup_steps", "2", "--optimizer.decay_steps", "20",
        "--eval.every_steps", "0", "--eval.at_end", "false"]   # tests/e2e/test_eval.py turns evaluation on


def train_cmd(*args: str, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [PYTHON, str(ROOT / "train.py"), *args]
    return [TORCHRUN, "--nproc_per_node", str(nproc), "--signals_to_handle", "SIGTERM,SIGINT,SIGUSR1,SIGUSR2",
            str(ROOT / "train.py"), *args]


def child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_END_TIME", "GPT_SIMPLE_MAX_RUNTIME")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def run_train(out: Path, data: Path, *args: str, nproc: int = 1, env: dict | None = None,
              timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run train.py (or torchrun) on the tiny config into `out`; extra args override."""
    cmd = train_cmd(*TINY, "--data.dir", str(data), "--data.demo", "false",
                    "--training.output_dir", str(out), *args, nproc=nproc)
    proc = subprocess.run(cmd, cwd=ROOT, env=env or child_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-3000:]}")
    return proc


def start_train(out: Path, data: Path, *args: str, nproc: int = 1, env: dict | None = None,
                **popen) -> subprocess.Popen:
    """Start train.py (or torchrun) on the tiny config in the background, in its own process group (so that a
    test can signal or kill the whole job); extra args override."""
    cmd = train_cmd(*TINY, "--data.dir", str(data), "--data.demo", "false", "--training.output_dir", str(out),
                    *args, nproc=nproc)
    return subprocess.Popen(cmd, cwd=ROOT, env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    """Wait for a start_train job; on timeout kill its process group. (returncode, stdout, stderr)"""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, stdout, stderr


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in metrics(out)]


def status_word(out: Path) -> str:
    proc = subprocess.run([PYTHON, str(ROOT / "status.py"), str(out)], capture_output=True, text=True)
    return proc.stdout.splitlines()[0] if proc.stdout else f"<exit {proc.returncode}: {proc.stderr.strip()}>"


def events(out: Path) -> list[dict]:
    path = Path(out) / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
