"""No silent paths, with real train.py processes and real files.

A failed checkpoint load is classified before anything is touched (gpt_simple/checkpoint/failures.py), with real
train.py processes and real files: a read the kernel fails with EIO (the environment) ends the launch as a transient,
resumable failure and leaves the checkpoint where it is; a flipped byte (damage) falls back to the checkpoint before
and moves the damaged one aside, which status.py lists and retention removes once the run has saved its steps again.
A collective timeout torch cannot apply is announced. A read-only bucket's valid index is used as it is. A run log's torn last line is dropped and recorded; a bad line
anywhere else stops the launch with one line naming the file and line, and nothing is rewritten.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gpt_simple.checkpoint import CHECKSUMS, COMMITTED, list_committed, read_dcp_metadata
from gpt_simple.journal import events as ev
from helpers.checkpoint import flip_tensor_byte
from helpers.paths import PYTHON, ROOT
from helpers.train import TINY, child_env, events, losses, run_train, status_word, train_cmd

ARGS = ("--training.save_steps", "2", "--training.keep_last_k", "2")


def kinds(out) -> list[str]:
    return [e["event"] for e in events(out)]


def shard_of(ckpt: Path) -> Path:
    where = max(read_dcp_metadata(ckpt).storage_data.values(), key=lambda s: s.length)
    return ckpt / where.relative_path


def status_text(out) -> str:
    return subprocess.run([PYTHON, str(ROOT / "status.py"), str(out)], capture_output=True, text=True).stdout


@pytest.mark.slow
def test_an_unreadable_checkpoint_is_transient_and_a_damaged_one_is_moved_aside_then_removed(tmp_path, demo_data):
    out, ref = tmp_path / "run", tmp_path / "ref"
    run_train(ref, demo_data, *ARGS, "--training.max_steps", "8")
    run_train(out, demo_data, *ARGS, "--training.max_steps", "6")
    newest = out / "checkpoints" / "step-6-final"
    assert [c.name for c in list_committed(out / "checkpoints")] == ["step-4", "step-6-final"]

    # The environment: the kernel fails the read (EIO: /proc/self/mem at an unmapped offset, a real I/O error)
    shard = shard_of(newest)
    kept = shard.with_name(shard.name + ".kept")
    os.replace(shard, kept)
    shard.symlink_to("/proc/self/mem")
    proc = run_train(out, demo_data, *ARGS, "--training.max_steps", "8", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: transient failure (resumable): ") and "step-6-final could not be read" in line
    assert "Errno 5" in line and "left as it is" in line
    assert status_word(out) == "STOPPED" and kinds(out)[-1] == ev.TransientFailure.kind
    assert (newest / COMMITTED).exists() and not any(p.name.startswith("corrupt-") for p in newest.parent.iterdir())
    shard.unlink()
    os.replace(kept, shard)

    # Damage: one flipped bit, caught by the checksums: fall back to step-4, step-6-final moved aside and listed
    flip_tensor_byte(newest)
    run_train(out, demo_data, *ARGS, "--training.max_steps", "5")
    assert [e["checkpoint"] for e in events(out) if e["event"] == ev.CheckpointFallback.kind] == ["step-6-final"]
    assert [e["checkpoint"] for e in events(out) if e["event"] == ev.Resume.kind][-1] == "step-4"
    assert (out / "checkpoints" / "corrupt-step-6-final").is_dir()
    assert "damaged   corrupt-step-6-final (moved aside, never loaded" in status_text(out)

    # The run saves step 6 again: retention removes the damaged copy, says so, and the losses are the reference's
    run_train(out, demo_data, *ARGS, "--training.max_steps", "8")
    removed = [e["names"] for e in events(out) if e["event"] == ev.QuarantineRemoved.kind]
    assert removed == [["corrupt-step-6-final"]]
    assert not (out / "checkpoints" / "corrupt-step-6-final").exists() and "damaged" not in status_text(out)
    assert status_word(out) == "COMPLETED" and losses(out) == losses(ref)

    # A checkpoint of the current format without its CHECKSUMS.json (an incomplete copy, an altered folder): damage
    (out / "checkpoints" / "step-8-final" / CHECKSUMS).unlink()
    run_train(out, demo_data, *ARGS, "--training.max_steps", "9")
    (fallback,) = [e for e in events(out) if e["event"] == ev.CheckpointFallback.kind][1:]
    assert fallback["checkpoint"] == "step-8-final" and f"no {CHECKSUMS}" in fallback["error"]
    assert [e["checkpoint"] for e in events(out) if e["event"] == ev.Resume.kind][-1] == "step-6"
    assert losses(out)[:8] == losses(ref) and status_word(out) == "COMPLETED"


@pytest.mark.slow
def test_a_collective_timeout_torch_cannot_apply_is_announced(tmp_path, demo_data):
    """torch offers no public way to change a process group's timeout after set-up; where its private one is missing
    (here: removed at interpreter start-up, as in a torch without it), the launch says so in one line and one event
    instead of training on with a bound nobody asked for."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import torch.distributed.distributed_c10d as c10d\n"
        "if hasattr(c10d, '_set_pg_timeout'):\n"
        "    del c10d._set_pg_timeout\n")
    out = tmp_path / "run"
    proc = run_train(out, demo_data, "--training.max_steps", "3", "--training.collective_timeout_seconds", "42",
                     nproc=2, env=child_env(PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])))
    lines = [line for line in proc.stderr.splitlines() if "collective_timeout_seconds (42) is not applied" in line]
    assert len(lines) == 1 and "_set_pg_timeout" in lines[0], proc.stderr
    (event,) = [e for e in events(out) if e["event"] == ev.CollectiveTimeoutUnavailable.kind]
    assert event["seconds"] == 42 and event["kept_s"] == 300 and "_set_pg_timeout" in event["why"]
    assert status_word(out) == "COMPLETED"

    plain = tmp_path / "plain"  # with torch's function there: applied, nothing announced
    proc = run_train(plain, demo_data, "--training.max_steps", "3", "--training.collective_timeout_seconds", "42",
                     nproc=2)
    assert "is not applied" not in proc.stderr
    assert ev.CollectiveTimeoutUnavailable.kind not in [e["event"] for e in events(plain)]


@pytest.mark.slow
def test_a_torn_last_line_is_dropped_and_recorded_a_bad_line_elsewhere_is_an_error(tmp_path, demo_data):
    out = tmp_path / "run"
    run_train(out, demo_data, "--training.max_steps", "3")
    with open(out / "events.jsonl", "a") as f:
        f.write('{"time": 1.0, "event": "sa')  # a kill in the middle of an append
    run_train(out, demo_data, "--training.max_steps", "5")
    (dropped,) = [e for e in events(out) if e["event"] == ev.TornLineDropped.kind]
    assert dropped["file"] == "events.jsonl" and dropped["text"] == '{"time": 1.0, "event": "sa'
    assert status_word(out) == "COMPLETED"  # every line of events.jsonl reads back (events() parses each)

    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[1] = lines[1][:20]  # damage in the middle of the file: not a kill's tear
    metrics.write_text("\n".join(lines) + "\n")
    before = metrics.read_bytes()
    proc = run_train(out, demo_data, "--training.max_steps", "7", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {metrics}, line 2: not a JSON record (Expecting value: line 1 column 21 (char 20)); "
        f"the file is damaged and nothing was rewritten")
    assert metrics.read_bytes() == before and status_word(out) == "ERROR"


def can_mount_read_only(path: Path) -> bool:
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind -o ro '{path}' '{path}'"],
                           capture_output=True, text=True)
    return probe.returncode == 0


@pytest.mark.slow
def test_a_read_only_bucket_with_a_valid_index_uses_it(tmp_path, demo_data):
    """The data folder mounted read-only (a bind mount in the launch's own mount namespace: a real read-only
    filesystem, where even root cannot write): the order index built beside each bucket by an earlier launch is
    used as it is, nothing is rebuilt under the user's cache, and the run trains the same tokens."""
    data = tmp_path / "data"
    shutil.copytree(demo_data, data, ignore=shutil.ignore_patterns(".index"))
    if not can_mount_read_only(data):
        pytest.skip("this machine cannot make a read-only bind mount (needs CAP_SYS_ADMIN in a mount namespace)")
    home = tmp_path / "home"
    home.mkdir()
    env = child_env(HOME=str(home))
    env.pop("GPT_SIMPLE_INDEX_DIR", None)
    first, second = tmp_path / "first", tmp_path / "second"
    run_train(first, data, "--training.max_steps", "3", env=env)
    indexes = sorted(p.relative_to(data) for p in data.glob("*/.index/order-*.bin"))
    assert indexes, "the first launch builds each bucket's order beside it"
    before = {p: p.stat().st_mtime_ns for p in data.rglob("*")}

    cmd = train_cmd(*TINY, "--data.dir", str(data), "--data.demo", "false", "--training.output_dir", str(second),
                    "--training.max_steps", "3")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind -o ro '{data}' '{data}' && exec \"$@\"",
                           "sh", *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cannot be written" not in proc.stderr, proc.stderr
    assert not (home / ".cache").exists()
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == before
    assert losses(second) == losses(first)
