"""Every benchmark runs: `bench/run.py --smoke` (each benchmark's code path once, on a small model, in real
subprocesses) exits 0, and every row it prints is well formed: numbers where numbers belong, a ratio, no
utilisation above 1. Its figures are not checked: they mean nothing at this size and on a shared machine.
bench/gpu.py is checked for what a machine without a GPU can check: its arguments and its runs' configs.
"""
import json
import math
import os
import subprocess
import sys

import pytest

from helpers.paths import PYTHON, ROOT

sys.path.insert(0, str(ROOT))
from bench.cli import SMOKE_MODEL  # noqa: E402
from bench.run import BENCHMARKS  # noqa: E402

pytestmark = pytest.mark.slow

CPU_BENCHMARKS = [name for name in BENCHMARKS if name != "gpu"]


def bench_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_END_TIME", "GPT_SIMPLE_MAX_RUNTIME")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def run_bench(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, *args], cwd=ROOT, env=bench_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_row(r: dict) -> None:
    assert isinstance(r["metric"], str) and r["metric"]
    assert r["ok"] in (True, False, None)
    if r["target"] == "skipped":
        assert r["ours"] is None and r["ratio"] is None and r["note"], r
        return
    assert is_number(r["ours"]), r  # a difference (training time lost to a save) can come out below 0
    assert r["baseline"] is None or (is_number(r["baseline"]) and r["baseline"] > 0), r
    if r["baseline"] is not None:
        assert is_number(r["ratio"]), r
    if r["target"] != "report":
        assert r["ok"] is not None, f"target {r['target']!r} was not judged: {r}"
    if "utilisation" in r["metric"] or "MFU" in r["metric"]:
        assert 0 <= r["ratio"] <= 1.0, f"a utilisation above 1: {r}"


@pytest.mark.parametrize("name", CPU_BENCHMARKS)
def test_every_benchmark_runs_and_prints_well_formed_rows(tmp_path, demo_data, name):
    """`bench/run.py --smoke --only NAME` for each CPU benchmark: one test each, so that xdist spreads them over
    its workers (no fixture is shared: each runs its benchmark once)."""
    out = tmp_path / "rows.json"
    proc = run_bench("bench/run.py", "--smoke", "--only", name, "--data-dir", str(demo_data), "--json", str(out))
    assert proc.returncode == 0, f"bench/run.py --smoke failed\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    result = json.loads(out.read_text())
    assert result["mode"] == "smoke" and "FAILED" not in proc.stdout
    assert [r for r in result["rows"] if r["benchmark"] == name], f"{name} printed no row"
    assert {r["benchmark"] for r in result["rows"]} == {name}
    for r in result["rows"]:
        check_row(r)
    table = [[c.strip() for c in line.split("|")[1:-1]] for line in proc.stdout.splitlines()
             if line.startswith("| ")]
    assert table[0] == ["metric", "ours", "baseline", "ratio", "target", "ok"]
    assert len(table) == 1 + len(result["rows"])
    for r, cells in zip(result["rows"], table[1:]):
        assert cells[0] == r["metric"] and cells[4] == r["target"]
        assert cells[3] != "n/a" or r["target"] == "skipped", cells


def test_gpu_benchmark_without_a_gpu(tmp_path):
    """Argument parsing, the standalone entry (main_for) and the runs' configs; a skipped row, exit 0."""
    assert run_bench("bench/gpu.py", "--help", timeout=60).returncode == 0
    proc = run_bench("bench/gpu.py", "--smoke", "--json", str(tmp_path / "gpu.json"), timeout=120,
                     CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["target"] == "skipped" and "configs checked" in rows[0]["note"]
    check_row(rows[0])
    assert run_bench("bench/gpu.py", "--smoke", "--quick", timeout=60).returncode == 2  # one mode at a time


def test_plain_loop_and_profile(demo_data):
    data = ["--data.dir", str(demo_data), "--data.demo", "false"]
    proc = run_bench("bench/plain_loop.py", "--steps", "2", *SMOKE_MODEL, *data, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    assert all(is_number(s["seconds"]) and s["seconds"] > 0 and is_number(s["loss"]) for s in steps)
    proc = run_bench("bench/profile_step.py", "--steps", "1", "--top", "3", *SMOKE_MODEL, *data, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wall per step: ours " in proc.stdout and "aten::" in proc.stdout
