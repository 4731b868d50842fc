"""The run-state file, written and read in this process. (status.py / `gpt-simple status`: e2e/test_status.py.)"""
import json

from helpers.status import write_state


def test_state_file_is_strict_json(tmp_path):
    write_state(tmp_path, status="RUNNING", loss=float("nan"))
    text = (tmp_path / "run_state.json").read_text()
    assert "NaN" not in text and json.loads(text)["loss"] is None
