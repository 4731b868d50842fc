"""Save safety with real processes and real filesystems (issue 13): a save that fails on a full disk, a flipped byte
in a committed checkpoint, and a deadline whose configured reserve is far below the measured save time.

The full-disk test mounts a small tmpfs (root; CI runs as root). Where mounting is impossible it skips, or fails
when GPT_SIMPLE_REQUIRE_SLURM=1 (CI's "require" switch, shared with the SLURM template test).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers.checkpoint import flip_tensor_byte
from helpers.paths import PYTHON, ROOT
from helpers.train import child_env, events, finish, losses, run_train, start_train, status_word

pytestmark = pytest.mark.slow

# Checkpoints of the tests' tiny model (with AdamW) are ~1.7 MB: a 5 MB tmpfs takes two and fails the third.
SAVES = ("--training.save_steps", "2", "--training.keep_last_k", "0")


def names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


@pytest.fixture
def small_disk(tmp_path):
    where = tmp_path / "small"
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5M", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        reason = f"cannot mount a tmpfs ({(proc.stderr or proc.stdout).strip() or proc.returncode})"
        if os.environ.get("GPT_SIMPLE_REQUIRE_SLURM") == "1":
            pytest.fail(f"GPT_SIMPLE_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_save_on_a_full_disk_is_one_error_line_and_the_run_resumes_elsewhere(tmp_path, demo_data, small_disk):
    ref = tmp_path / "ref"
    run_train(ref, demo_data, *SAVES, "--training.max_steps", "12")

    out = small_disk / "run"
    proc = run_train(out, demo_data, *SAVES, "--training.max_steps", "12", check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "saving step-" in errors[0] and "No space left on device" in errors[0] and " free" in errors[0]
    assert "warning: " in proc.stderr and "MB free" in proc.stderr  # warned with figures before the failing save
    assert status_word(out) == "ERROR"
    state = json.loads((out / "run_state.json").read_text())
    assert state["status"] == "ERROR" and "No space left on device" in state["reason"]
    kept = names(out)
    assert kept and not [n for n in kept if n.startswith(".")], kept  # no partial left
    assert all((out / "checkpoints" / n / "COMMITTED").exists() for n in kept)

    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    run_train(moved, demo_data, *SAVES, "--training.max_steps", "12")
    assert status_word(moved) == "COMPLETED"
    assert losses(moved) == losses(ref)


def test_a_flipped_byte_in_the_newest_checkpoint_falls_back_naming_the_file(tmp_path, demo_data):
    ref = tmp_path / "ref"
    run_train(ref, demo_data, *SAVES, "--training.max_steps", "10")
    out = tmp_path / "run"
    run_train(out, demo_data, *SAVES, "--training.max_steps", "6")
    assert flip_tensor_byte(out / "checkpoints" / "step-6-final") == "__0_0.distcp"  # the format stays valid

    check = subprocess.run([PYTHON, "-m", "gpt_simple.cli", "verify", str(out)], cwd=ROOT, capture_output=True,
                           text=True)
    assert check.returncode == 1 and "step-6-final: DAMAGED" in check.stdout and "__0_0.distcp" in check.stdout
    assert "step-4: ok" in check.stdout

    proc = run_train(out, demo_data, *SAVES, "--training.max_steps", "10")
    assert "Traceback" not in proc.stderr
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning: checkpoint step-6-final")]
    assert warning and "__0_0.distcp" in warning[0] and "checksum mismatch" in warning[0], proc.stderr
    fallback = [e for e in events(out) if e["event"] == "checkpoint_fallback"]
    assert [e["checkpoint"] for e in fallback] == ["step-6-final"] and "__0_0.distcp" in fallback[0]["error"]
    assert [e["checkpoint"] for e in events(out) if e["event"] == "resume"] == ["step-4"]
    assert "corrupt-step-6-final" in names(out)
    assert status_word(out) == "COMPLETED" and losses(out) == losses(ref)


def test_verification_can_be_switched_off(tmp_path, demo_data):
    out = tmp_path / "run"
    run_train(out, demo_data, *SAVES, "--training.max_steps", "4")
    flip_tensor_byte(out / "checkpoints" / "step-4-final")
    proc = run_train(out, demo_data, *SAVES, "--training.max_steps", "5", "--training.verify_checkpoints", "false")
    assert "resumed from step-4-final" in proc.stdout and "checksum" not in proc.stderr


def test_the_shutdown_save_fits_before_the_deadline_when_the_reserve_is_too_small(tmp_path, demo_data):
    """Every checkpoint write sleeps 2 s (a slow filesystem) and the reserve is 0.2 s: the stop decision keeps the
    measured save time (with its margin) instead, so the shutdown checkpoint is committed before the deadline."""
    out = tmp_path / "run"
    env = child_env(GPT_SIMPLE_MAX_RUNTIME="20", GPT_SIMPLE_DRILL="save=2")  # saves measured from ~1 s after set-up
    proc = start_train(out, demo_data, "--training.max_steps", "100000", "--training.save_steps", "20",
                       "--training.walltime_reserve_seconds", "0.2", "--training.log_steps", "50", env=env)
    code, stdout, stderr = finish(proc, timeout=120)
    assert code == 0, stderr
    assert "Traceback" not in stderr
    state = json.loads((out / "run_state.json").read_text())
    assert state["status"] == "STOPPED" and state["reason"].startswith("deadline"), state
    # the state at the stop is saved: a step-N-shutdown, or the periodic step-N in flight when the stop came
    last = [n for n in names(out) if n in (f"step-{state['step']}", f"step-{state['step']}-shutdown")]
    assert last, (names(out), state["step"])
    committed_at = json.loads((out / "checkpoints" / last[-1] / "COMMITTED").read_text())["committed_at"]
    assert committed_at < state["deadline_at"], (committed_at, state["deadline_at"])
    assert "the stop decision now keeps" in stderr  # the measured figure overruled the reserve, said once
    assert stderr.count("the stop decision now keeps") == 1
    assert [e for e in events(out) if e["event"] == "save_budget"]


def test_a_resumed_launch_budgets_its_first_stop_with_the_save_time_measured_before(tmp_path, demo_data):
    """A launch without periodic saves measures nothing before its shutdown save. The save time the previous launch
    measured (carried in run_state.json) budgets its stop from the first step: with a 0.2 s reserve and 2 s writes,
    the shutdown checkpoint is still committed before the deadline (with the reserve alone it lands after)."""
    out = tmp_path / "run"
    run_train(out, demo_data, "--training.max_steps", "3", env=child_env(GPT_SIMPLE_DRILL="save=2"))
    measured = json.loads((out / "run_state.json").read_text())["durations"]["save_sync_s"]
    assert measured >= 2  # the final save, with its 2 s write

    env = child_env(GPT_SIMPLE_MAX_RUNTIME="20", GPT_SIMPLE_DRILL="save=2")
    proc = run_train(out, demo_data, "--training.max_steps", "100000", "--training.walltime_reserve_seconds", "0.2",
                     "--training.log_steps", "50", env=env, timeout=120)
    assert "the previous launch measured a save of" in proc.stderr, proc.stderr[-2000:]
    state = json.loads((out / "run_state.json").read_text())
    assert state["status"] == "STOPPED" and state["reason"].startswith("deadline"), state
    last = out / "checkpoints" / f"step-{state['step']}-shutdown"
    committed_at = json.loads((last / "COMMITTED").read_text())["committed_at"]
    assert committed_at < state["deadline_at"], (committed_at, state["deadline_at"])
    (budget,) = [e for e in events(out) if e["event"] == "save_budget"]
    assert budget["launch"] == 2 and budget["carried"] and budget["measured_s"] == measured
