"""Helpers of the orchestration-template tests (tests/e2e/test_templates.py, tests/e2e/test_k8s_multinode.py): a
clean environment for the scripts, the run's status and events, loss traces and the uninterrupted reference."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import yaml

from helpers.paths import PYTHON
from helpers.paths import ROOT as REPO
from helpers.train import TINY_MODEL

# A recent Kubernetes release whose schemas kubernetes-validate ships (it carries 1.25 ... 1.37).
K8S_VERSION = "1.33.0"
TERMINAL = {"COMPLETED", "HALTED", "ERROR", "CRASHED"}


def manifest_objects(path: Path) -> dict[str, dict]:
    """The objects of a multi-document manifest, by kind."""
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    return {d["kind"]: d for d in docs}


def container_env(job: dict) -> dict[str, str]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def clean_env(**extra: str) -> dict[str, str]:
    """The test process' environment without anything that would change a run's deadline or settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "GPT_SIMPLE_", "TORCHELASTIC_"))
           and k not in ("NPROC", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # one thread per run: runs side by side on 2 cores, and the same float reductions in every run
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHON=PYTHON, PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def status_of(outdir: Path) -> str:
    r = subprocess.run([PYTHON, str(REPO / "status.py"), str(outdir)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, f"status.py {outdir}: exit {r.returncode}\n{r.stdout}{r.stderr}"
    return r.stdout.splitlines()[0].strip()


def events(outdir: Path) -> list[dict]:
    path = outdir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def launches(outdir: Path) -> list[list[dict]]:
    """events.jsonl split per launch (one launch = one training process)."""
    out: dict[int, list[dict]] = {}
    for e in events(outdir):
        out.setdefault(e["launch"], []).append(e)
    return [out[k] for k in sorted(out)]


def end_events(launch: list[dict]) -> list[dict]:
    return [e for e in launch if e["event"] in ("stop", "complete", "halt", "error")]


def loss_trace(outdir: Path) -> list[tuple[int, float]]:
    lines = (outdir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, filter(str.strip, lines))]


def assert_same_losses(run: Path, reference: Path) -> None:
    got, want = loss_trace(run), loss_trace(reference)
    assert [s for s, _ in got] == [s for s, _ in want], "logged steps differ (a step skipped or repeated)"
    diff = [(s, a, b) for (s, a), (_, b) in zip(got, want) if a != b]
    assert not diff, f"{len(diff)} losses differ from the uninterrupted run, first: {diff[:3]}"


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def logged_steps(outdir: Path) -> int:
    path = outdir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def tiny_args(demo: Path, max_steps: int, reserve: float) -> list[str]:
    """configs/tiny.toml shrunk to helpers.train.TINY's model (a step is the orchestration's unit here, not the
    model's work: the chains' step floor, GPT_SIMPLE_DRILL="step=...", sets how many fit a job)."""
    return ["--data.dir", str(demo), "--training.max_steps", str(max_steps), "--training.log_steps", "1",
            "--training.walltime_reserve_seconds", str(reserve), "--training.tensorboard", "false",
            "--eval.every_steps", "0", "--eval.at_end", "false",   # evaluation in chains: tests/e2e/test_eval.py
            *TINY_MODEL]


def start_reference(demo: Path, outdir: Path, max_steps: int) -> subprocess.Popen:
    """An uninterrupted run of the same config (no deadline), started beside the orchestrated one."""
    log = open(outdir.parent / f"{outdir.name}.log", "w")
    return subprocess.Popen([PYTHON, str(REPO / "train.py"), "--config", "configs/tiny.toml",
                             "--training.output_dir", str(outdir), *tiny_args(demo, max_steps, 10)],
                            cwd=REPO, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)


def finish_reference(proc: subprocess.Popen, outdir: Path) -> None:
    assert proc.wait(timeout=600) == 0, (outdir.parent / f"{outdir.name}.log").read_text()[-3000:]
    assert status_of(outdir) == "COMPLETED"
    assert len(launches(outdir)) == 1


def assert_bash_syntax(text: str, tmp_path: Path) -> None:
    """`bash -n` accepts a script (e.g. an entrypoint embedded in a manifest)."""
    script = tmp_path / "entrypoint.sh"
    script.write_text(text)
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
