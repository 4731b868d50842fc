"""The run-state file, written and read in this process. (status.py / `gpt-simple status`: e2e/test_status.py.)"""
import json

from helpers.status import write_state


def test_state_file_is_strict_json(tmp_path):
    write_state(tmp_path, status="RUNNING", loss=float("nan"))
    text = (tmp_path / "run_state.json").read_text()
    assert "NaN" not in text and json.loads(text)["loss"] is None


def test_a_dead_unreaped_process_is_not_alive():
    """A killed child this process has not reaped yet is a zombie: kill(pid, 0) still succeeds, but it is gone
    (torchrun workers left so when their agent is SIGKILLed under a PID 1 that does not reap)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from gpt_simple.run_state import _pid_alive
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert _pid_alive(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.time() + 10
        while _pid_alive(child.pid) and time.time() < deadline:
            time.sleep(0.01)
        assert not _pid_alive(child.pid)
        os.kill(child.pid, 0)  # still there, unreaped
    finally:
        child.kill()
        child.wait()
