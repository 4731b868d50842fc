"""status.py / `gpt-simple status`: the word on line 1, a summary, --json, and documented exit codes."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from gpt_simple.run_state import effective_status
from helpers.status import write_state
from helpers.train import PYTHON, ROOT, run_train, status_word


def status(*args):
    return subprocess.run([PYTHON, str(ROOT / "status.py"), *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("recorded", ["STOPPED", "COMPLETED", "HALTED", "ERROR"])
def test_terminal_and_resumable_states(tmp_path, recorded):
    write_state(tmp_path, status=recorded, reason="why not", step=7, max_steps=10, tokens=70)
    proc = status(tmp_path)
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert lines[0] == recorded
    assert "step      7/10  tokens 70" in proc.stdout and "reason    why not" in proc.stdout


def test_running_with_live_pid(tmp_path):
    write_state(tmp_path, status="RUNNING", reason="training")  # this test process is the live writer
    assert status(tmp_path).stdout.splitlines()[0] == "RUNNING"


def test_crashed_when_pid_gone(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    rs = write_state(tmp_path, status="RUNNING")
    rs.update(pid=dead.pid)
    proc = status(tmp_path)
    assert proc.stdout.splitlines()[0] == "CRASHED"
    assert f"process {dead.pid} on {socket.gethostname()} is gone" in proc.stdout


def test_crashed_when_heartbeat_stale_from_another_host(tmp_path):
    rs = write_state(tmp_path, status="RUNNING")
    rs.state.update(host="elsewhere", heartbeat_at=time.time() - 600, stale_after_s=300)
    (tmp_path / "run_state.json").write_text(json.dumps(rs.state))
    assert status(tmp_path).stdout.splitlines()[0] == "CRASHED"
    rs.state.update(heartbeat_at=time.time() - 100)
    assert effective_status(rs.state)[0] == "RUNNING"  # another host's pid is never probed locally


def test_json_output(tmp_path):
    write_state(tmp_path, status="STOPPED", reason="signal SIGTERM", step=3)
    proc = status("--json", tmp_path)
    state = json.loads(proc.stdout)
    assert state["status"] == "STOPPED" and state["step"] == 3 and state["pid"] == os.getpid()


def test_no_run_exit_3(tmp_path):
    proc = status(tmp_path)
    assert proc.returncode == 3 and "no run here" in proc.stderr and proc.stdout == ""


def test_parent_folder_lists_its_runs(tmp_path):
    write_state(tmp_path / "a", status="COMPLETED", step=10, max_steps=10)
    write_state(tmp_path / "group" / "b", status="STOPPED", step=4, max_steps=10)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "run_state.json").write_text("{not json")
    proc = status(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"COMPLETED  10/10  {tmp_path / 'a'}", f"CORRUPT    None/None  {tmp_path / 'c'}",
                                        f"STOPPED    4/10  {tmp_path / 'group' / 'b'}"]
    rows = json.loads(status("--json", tmp_path).stdout)
    assert [r["status"] for r in rows] == ["COMPLETED", "CORRUPT", "STOPPED"]


def test_missing_dir_exit_3(tmp_path):
    assert status(tmp_path / "nope").returncode == 3


@pytest.mark.parametrize("content", ["{not json", '{"status": "BOGUS"}', "[]", ""])
def test_corrupt_state_exit_4(tmp_path, content):
    (tmp_path / "run_state.json").write_text(content)
    proc = status(tmp_path)
    assert proc.returncode == 4 and "corrupt state file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_usage_exit_2():
    proc = subprocess.run([PYTHON, str(ROOT / "status.py")], capture_output=True, text=True)
    assert proc.returncode == 2


def test_console_entry_output_dir_flag(tmp_path):
    write_state(tmp_path, status="COMPLETED")
    proc = subprocess.run([PYTHON, "-m", "gpt_simple", "status", "--output_dir", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.splitlines()[0] == "COMPLETED"


@pytest.mark.slow
def test_user_error_in_a_run_is_recorded_as_error(tmp_path, demo_data):
    out = tmp_path / "run"
    proc = run_train(out, tmp_path / "no-data", "--training.max_steps", "3", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: data.dir '{tmp_path / 'no-data'}': folder does not exist "
                                                f"(run `gpt-simple prepare` first)"]
    assert status_word(out) == "ERROR"
    assert "folder does not exist" in json.loads((out / "run_state.json").read_text())["reason"]


def test_reader_closing_the_pipe_early_is_not_an_error(tmp_path):
    """`status.py OUT | head -1`: a reader that has gone away is not a traceback."""
    write_state(tmp_path, status="STOPPED", reason="signal SIGTERM", step=3)
    proc = subprocess.Popen([PYTHON, str(ROOT / "status.py"), str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # gone before the status is written (the interpreter takes a while to start)
    stderr = proc.stderr.read()
    assert proc.wait() == 0 and "Traceback" not in stderr, stderr
