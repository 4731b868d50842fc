"""In-job restarts, repeated: a 2-rank run under `torchrun --max-restarts 2`, one worker SIGKILLed mid-run, N times.

    python scripts/restart_trials.py [--trials 20] [--steps 40] [--kill-at 12]

Each trial must end COMPLETED in one torchrun (its agent restarts the workers; no resubmission) with the losses of
an uninterrupted 2-rank run (`==`). Printed per trial: the outcome, the launches it took and the seconds from the
kill to the end; then "N of N" and the median seconds. A trial that does not end within --timeout is killed and
counted as failed. Figures: docs/orchestration.md ("In-job restarts").
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from gpt_simple.journal.events import Launch  # noqa: E402

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
TINY = ["--config", "configs/tiny.toml", "--model.n_layer", "2", "--model.n_embd", "64", "--model.n_head", "2",
        "--data.seq_len", "64", "--model.block_size", "64", "--training.global_batch_size", "8",
        "--training.micro_batch_size", "4", "--training.peak_flops", "1e12", "--training.log_steps", "1",
        "--training.save_steps", "5", "--eval.every_steps", "0", "--eval.at_end", "false",
        "--training.tensorboard", "false", "--training.collective_timeout_seconds", "20"]


def command(out: Path, steps: int, restarts: int) -> list[str]:
    return [TORCHRUN, "--nproc_per_node", "2", f"--max-restarts={restarts}", "--monitor-interval", "0.5",
            str(ROOT / "train.py"), *TINY, "--training.max_steps", str(steps), "--training.output_dir", str(out)]


def records(out: Path, name: str) -> list[dict]:
    path = out / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records(out, "metrics.jsonl")]


def rank_one(agent_pid: int) -> int:
    """The worker of local rank 1 among the agent's children."""
    for pid in subprocess.run(["pgrep", "-P", str(agent_pid)], capture_output=True, text=True).stdout.split():
        try:
            if b"LOCAL_RANK=1\x00" in Path(f"/proc/{pid}/environ").read_bytes():
                return int(pid)
        except OSError:
            continue
    raise RuntimeError("no worker of local rank 1 found")


def trial(out: Path, args, env: dict, reference: list) -> tuple[bool, str, float]:
    log = open(out.with_suffix(".log"), "w")
    proc = subprocess.Popen(command(out, args.steps, 2), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    while len(losses(out)) < args.kill_at:
        if proc.poll() is not None:
            return False, f"ended before the kill (exit {proc.returncode})", 0.0
        time.sleep(0.05)
    os.kill(rank_one(proc.pid), signal.SIGKILL)
    killed = time.time()
    try:
        proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return False, f"did not end within {args.timeout:g}s", args.timeout
    seconds = time.time() - killed
    state = json.loads((out / "run_state.json").read_text())
    launches = sum(1 for e in records(out, "events.jsonl") if e["event"] == Launch.kind)
    ok = state["status"] == "COMPLETED" and losses(out) == reference
    what = f"{state['status']}, {launches} launches, losses {'==' if losses(out) == reference else '!='} reference"
    return ok, what, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--kill-at", type=int, default=12, help="SIGKILL rank 1 once this many steps are logged")
    parser.add_argument("--timeout", type=float, default=180)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="gpt-simple-restarts-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command(root / "reference", args.steps, 0), cwd=ROOT, env=env, capture_output=True, check=True,
                   timeout=600)
    reference = losses(root / "reference")
    # steps slowed through the test seam, so that the kill lands mid-run on any machine
    drilled = {**env, "GPT_SIMPLE_DRILL": "step=0.15"}
    results = []
    for i in range(args.trials):
        ok, what, seconds = trial(root / f"trial-{i:02d}", args, drilled, reference)
        results.append((ok, seconds))
        print(f"trial {i + 1:2d}: {'ok  ' if ok else 'FAIL'} {what}; {seconds:.1f}s from the kill to the end",
              flush=True)
    good = [s for ok, s in results if ok]
    print(f"{len(good)} of {len(results)} completed with the uninterrupted losses"
          + (f"; median {statistics.median(good):.1f}s from the kill to the end" if good else "")
          + f" (runs under {root})")
    return 0 if len(good) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
