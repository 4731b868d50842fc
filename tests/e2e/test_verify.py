"""`gpt-simple verify`: the resume proof (`--replay K`: a checkpoint's next steps trained again in a scratch folder
and compared with the run's records) and the digest chain of a run's checkpoints, with real train.py / torchrun
processes and real files. The pure parts (the verdict, where the records came from, the chain's link checks):
unit/test_verify.py."""
import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from gpt_simple.checkpoint import CHECKSUMS, list_committed, read_dcp_metadata
from gpt_simple.checkpoint.files import checksum_files
from gpt_simple.journal import events as ev
from helpers.train import PYTHON, ROOT, TORCHRUN, child_env, events, finish, metrics, run_train, start_train
from helpers.train import status_word

# evaluations every 2 steps, on a small share of the held-out split: the replay compares them too
EVAL = ("--eval.every_steps", "2", "--eval.tokens", "2048")


def verify(*args: str, nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """`gpt-simple verify ...` as `python -m gpt_simple` (this checkout's package), or under torchrun."""
    head = [PYTHON, "-m"] if nproc == 1 else [TORCHRUN, "--nproc_per_node", str(nproc), "-m"]
    return subprocess.run([*head, "gpt_simple", "verify", *args], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=timeout)


def verdict(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout.strip().splitlines()[-1]


def tree(path: Path) -> dict[str, str]:
    """Every file and folder under `path`: relative name -> sha256 of its bytes ('dir' for a folder)."""
    return {str(p.relative_to(path)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).rglob("*"))}


def committed(out: Path) -> list[str]:
    return [c.name for c in list_committed(out / "checkpoints")]


def last_step(out: Path) -> int:
    steps = [m["step"] for m in metrics(out) if m.get("type") != "eval"] if (out / "metrics.jsonl").exists() else []
    return max(steps, default=0)


def descendants(pid: int) -> list[int]:
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    return [d for c in map(int, children) for d in (c, *descendants(c))]


def kill_9_job(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers at once (they run in sessions of their own: its process group alone would
    leave them training)."""
    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    finish(proc)


@pytest.mark.slow
def test_replay_of_a_killed_two_rank_chain(tmp_path, demo_data):
    """A 2-rank run SIGKILLed mid-run (after step-4 committed) and resumed on 2 ranks: its chain verifies from the
    oldest checkpoint retention kept; steps 5-7 trained again from step-4 are `exact` on 2 ranks (torchrun) and
    within 1e-5 on 1 process (another world size adds FSDP's reductions in another order: the verdict says so);
    RUN_DIR is unchanged by all of it, and a replay past the run's records is refused with one line."""
    out = tmp_path / "run"
    args = ("--training.max_steps", "8", "--training.save_steps", "2", "--training.keep_last_k", "3", *EVAL)
    proc = start_train(out, demo_data, *args, nproc=2, env=child_env(GPT_SIMPLE_DRILL="step=0.3"))
    try:
        deadline = time.time() + 180
        while not ("step-4" in committed(out) and last_step(out) >= 5):
            assert proc.poll() is None and time.time() < deadline, "the job ended before step-4 and step 5"
            time.sleep(0.02)
        killed_at = (last_step(out), committed(out))
    finally:
        kill_9_job(proc)
    # killed mid-run: no end recorded, steps after step-4 logged and lost, no final checkpoint
    assert status_word(out) == "CRASHED" and 5 <= last_step(out) < 8, killed_at
    assert "step-8-final" not in committed(out) and not ev.records_of(events(out), *map(ev.CATALOGUE.get, ev.ENDINGS))
    run_train(out, demo_data, *args, nproc=2)
    assert status_word(out) == "COMPLETED"
    assert [e["checkpoint"] for e in ev.records_of(events(out), ev.Resume)] == ["step-4"]
    assert committed(out) == ["step-4", "step-6", "step-8-final"]  # step-2 went (keep_last_k 3)
    before = tree(out)

    chain = verify(str(out))
    assert chain.returncode == 0, chain.stdout + chain.stderr
    lines = chain.stdout.splitlines()
    assert len(lines) == 3 and all(" ok (" in line and "chain " in line for line in lines)
    assert "ok after step-2" in lines[0] and "ok after step-4" in lines[1] and "ok after step-6" in lines[2]

    two = verify(str(out), "--replay", "3", "--from", "step-4", nproc=2)
    assert two.returncode == 0 and verdict(two).startswith("exact: 3 logged steps"), two.stdout[-3000:] + two.stderr
    assert "and 1 evaluation(s) equal" in verdict(two)  # step 6's
    assert "in launch 2 (world size 2, mesh [1, 2]), which resumed from step-4; the same world size" in two.stdout

    one = verify(str(out), "--replay", "3", "--from", "step-4", "--tol", "1e-5")
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr
    assert verdict(one).startswith(("within 1e-05: 3 logged steps", "exact: 3 logged steps")), verdict(one)
    assert "a different world size: replayed on 1" in one.stdout

    past = verify(str(out), "--replay", "5")  # the newest, step-8-final: nothing after it to compare with
    assert past.returncode == 2 and past.stderr.strip().splitlines() == [
        f"error: {out / 'metrics.jsonl'}: no step after step-8-final recorded: nothing to compare a replay with"]
    assert tree(out) == before


def nudge_weight(ckpt: Path) -> str:
    """Add 0.25 to one weight of a checkpoint's largest MLP matrix, in its DCP file, and record that file's new
    checksums so that it loads: a checkpoint that is not the one the run saved. The tensor's name."""
    where = {k.fqn: v for k, v in read_dcp_metadata(ckpt).storage_data.items()}
    name = max((n for n in where if n.startswith("model.") and ".mlp." in n and n.endswith("weight")),
               key=lambda n: where[n].length)
    item = where[name]
    path = ckpt / item.relative_path
    data = bytearray(path.read_bytes())
    blob = bytes(data[item.offset:item.offset + item.length])  # torch.save's zip of the tensor
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        header = next(i for i in z.infolist() if i.filename.endswith("/data/0")).header_offset
    name_len, extra_len = struct.unpack("<HH", blob[header + 26:header + 30])
    at = item.offset + header + 30 + name_len + extra_len + 4 * 7  # the 8th float of the storage
    (value,) = struct.unpack("<f", data[at:at + 4])
    data[at:at + 4] = struct.pack("<f", value + 0.25)
    path.write_bytes(bytes(data))
    record = json.loads((ckpt / CHECKSUMS).read_text())
    record["files"].update(checksum_files(ckpt, [item.relative_path]))
    (ckpt / CHECKSUMS).write_text(json.dumps(record, sort_keys=True))
    return name


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, demo_data) -> Path:
    """One process, 4 steps, checkpoints step-2 and step-4-final: the tests below work on copies."""
    out = tmp_path_factory.mktemp("verify") / "run"
    run_train(out, demo_data, "--training.max_steps", "4", "--training.save_steps", "2", "--training.keep_last_k",
              "0")
    assert committed(out) == ["step-2", "step-4-final"]
    return out


@pytest.mark.slow
def test_a_perturbed_checkpoint_replays_differently(tmp_path, small_run):
    """One weight of the run's step-2 changed (its checksums re-recorded, so it loads): the replay differs from
    step 3 on, exit 1; and the chain names the checkpoint as not what its commit recorded."""
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    same = verify(str(run), "--replay", "2", "--from", "step-2")
    assert same.returncode == 0 and verdict(same).startswith("exact: 2 logged steps"), same.stdout + same.stderr
    nudge_weight(run / "checkpoints" / "step-2")
    proc = verify(str(run), "--replay", "2", "--from", "step-2")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr
    assert verdict(proc).startswith("differs from step 3: loss "), verdict(proc)
    chain = verify(str(run))
    assert chain.returncode == 1
    assert chain.stdout.splitlines()[0].startswith("step-2: NOT THIS RUN'S: its checksums are not those its commit "
                                                   "recorded")


@pytest.mark.slow
def test_a_checkpoint_from_another_run_breaks_the_chain(tmp_path, small_run, demo_data):
    """A checkpoint copied in from another run (same name), and one of the run's own renamed: each is named, exit
    1; the untouched ones still verify."""
    other = tmp_path / "other"
    run_train(other, demo_data, "--training.max_steps", "3", "--training.save_steps", "2", "--training.seed", "7")
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    shutil.rmtree(run / "checkpoints" / "step-2")
    shutil.copytree(other / "checkpoints" / "step-2", run / "checkpoints" / "step-2")
    proc = verify(str(run))
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("step-2: NOT THIS RUN'S: not a checkpoint this run committed: no save in "
                               "events.jsonl records its digest"), lines
    assert lines[1].startswith("step-4-final: ok (") and "chain" in lines[1]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: step-2: not a checkpoint this run committed")

    moved = tmp_path / "moved"
    shutil.copytree(small_run, moved)
    os.rename(moved / "checkpoints" / "step-2", moved / "checkpoints" / "step-3")
    proc = verify(str(moved))
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[0] == \
        "step-3: NOT THIS RUN'S: holds what this run committed as step-2 (renamed or reordered)"
