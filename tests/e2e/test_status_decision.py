"""`status.py OUTDIR --decision`: the one line WORD<TAB>ACTION<TAB>reason the orchestrator templates act on."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gpt_simple import status_report as st
from gpt_simple.run_state import STATUSES, RunState

ROOT = Path(__file__).resolve().parents[2]


def write_state(out: Path, **fields) -> RunState:
    """A real run_state.json, written by the trainer's own writer."""
    out.mkdir(parents=True, exist_ok=True)
    rs = RunState(out)
    rs.update(**fields)
    return rs


def cli(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "status.py"), str(out), "--decision"],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("recorded, action", [("STOPPED", "resume"), ("COMPLETED", "done"), ("HALTED", "halted"),
                                              ("ERROR", "failed")])
def test_recorded_status_to_action(tmp_path, recorded, action):
    write_state(tmp_path, status=recorded, reason=f"why {recorded}")
    assert st.decision(tmp_path) == (recorded, action, f"why {recorded}")


def test_no_run_yet_is_start(tmp_path):
    word, action, reason = st.decision(tmp_path / "empty")
    assert (word, action) == ("NONE", "start") and "no run_state.json" in reason


def test_corrupt_state_is_failed(tmp_path):
    tmp_path.joinpath("run_state.json").write_text('{"status": ')
    word, action, reason = st.decision(tmp_path)
    assert (word, action) == ("UNREADABLE", "failed") and "corrupt state file" in reason
    tmp_path.joinpath("run_state.json").write_text(json.dumps({"status": "SLEEPING"}))
    assert st.decision(tmp_path)[:2] == ("UNREADABLE", "failed")


def test_running_with_a_live_writer_is_resume(tmp_path):
    write_state(tmp_path, status="RUNNING", reason="training")  # this test process is the live writer
    assert st.decision(tmp_path) == ("RUNNING", "resume", "training")


def test_running_whose_writer_is_gone_is_crashed_and_failed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_state(tmp_path, status="RUNNING").update(pid=dead.pid)
    word, action, reason = st.decision(tmp_path)
    assert (word, action) == ("CRASHED", "failed") and f"process {dead.pid}" in reason


def test_stale_heartbeat_from_another_host_is_crashed(tmp_path):
    rs = write_state(tmp_path, status="RUNNING")
    rs.state.update(host="elsewhere", stale_after_s=300)
    tmp_path.joinpath("run_state.json").write_text(json.dumps(rs.state))
    now = rs.state["heartbeat_at"]
    assert st.decision(tmp_path, now=now + 100)[:2] == ("RUNNING", "resume")
    assert st.decision(tmp_path, now=now + 600)[:2] == ("CRASHED", "failed")


def test_reason_is_one_line_without_tabs_and_never_empty(tmp_path):
    write_state(tmp_path, status="ERROR", reason="RuntimeError:\tbad\nthings  happened\r\n")
    assert st.decision(tmp_path) == ("ERROR", "failed", "RuntimeError: bad things happened")
    write_state(tmp_path, status="COMPLETED", reason=None)
    assert st.decision(tmp_path)[2] == "no reason recorded"


def test_every_status_has_an_action_from_the_vocabulary():
    words = set(STATUSES) | {st.NONE, st.UNREADABLE}
    assert set(st.DECISIONS) == words
    assert set(st.DECISIONS.values()) <= set(st.ACTIONS)
    assert all(re.fullmatch(r"[a-z][a-z_-]*", a) for a in st.ACTIONS)  # one shell word each


def test_cli_prints_one_tab_separated_line_and_exits_0(tmp_path):
    write_state(tmp_path / "run", status="STOPPED", reason="deadline (GPT_SIMPLE_MAX_RUNTIME)", step=3)
    tmp_path.joinpath("bad").mkdir()
    tmp_path.joinpath("bad", "run_state.json").write_text("{not json")
    for out, want in [("run", ["STOPPED", "resume", "deadline (GPT_SIMPLE_MAX_RUNTIME)"]),
                      ("bad", ["UNREADABLE", "failed"]), ("none", ["NONE", "start"])]:
        proc = cli(tmp_path / out)
        assert proc.returncode == 0, proc.stderr
        (line,) = proc.stdout.splitlines()
        assert line.split("\t")[:len(want)] == want and line.count("\t") == 2


LIB = "scripts/template_lib.sh"
SOURCE_LIB = '. "$GPT_SIMPLE_HOME/scripts/template_lib.sh"'


def templates() -> dict[str, str]:
    """The text of each template (the Kubernetes one: the entrypoint in its ConfigMap)."""
    k8s = [d for d in yaml.safe_load_all((ROOT / "k8s" / "job.yaml").read_text()) if d and d["kind"] == "ConfigMap"]
    return {"scripts/local_loop.sh": (ROOT / "scripts" / "local_loop.sh").read_text(),
            "slurm/resume_chain.sh": (ROOT / "slurm" / "resume_chain.sh").read_text(),
            "k8s/job.yaml": k8s[0]["data"]["entrypoint.sh"]}


def read_status_definitions(text: str) -> list[str]:
    return re.findall(r"^( *)read_status\(\) \{\n.*?^\1\}\n", text, re.M | re.S)


def run_read_status(out: Path, python: str = sys.executable) -> list[str]:
    """`read_status` as the templates get it: from template_lib.sh, sourced from GPT_SIMPLE_HOME."""
    script = f'{SOURCE_LIB}\nread_status\nprintf "%s|%s|%s" "$STATUS" "$ACTION" "$REASON"\n'
    env = {**os.environ, "PYTHON": python, "GPT_SIMPLE_HOME": str(ROOT), "OUTDIR": str(out)}
    r = subprocess.run(["bash", "-c", "set -uo pipefail\n" + script], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.split("|")


def test_the_templates_share_one_read_status_and_it_parses_the_line(tmp_path):
    lib = (ROOT / LIB).read_text()
    assert len(read_status_definitions(lib)) == 1, f"{LIB} must define read_status() once"
    r = subprocess.run(["bash", "-n", str(ROOT / LIB)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name, text in templates().items():
        assert not read_status_definitions(text), f"{name} defines its own read_status(); use {LIB}'s"
        # sourced from GPT_SIMPLE_HOME, never next to $0 (under SLURM, $0 is a spooled copy)
        assert re.search(r'^ *TEMPLATE_LIB=\$GPT_SIMPLE_HOME/scripts/template_lib\.sh\b', text, re.M), name
        assert '. "$TEMPLATE_LIB"' in text, name
    write_state(tmp_path / "run", status="ERROR", reason="resuming with another architecture: n_layer 2 != 4")
    assert run_read_status(tmp_path / "run") == ["ERROR", "failed", "resuming with another architecture: n_layer 2 != 4"]
    assert run_read_status(tmp_path / "none")[:2] == ["NONE", "start"]
    # a python that cannot run prints no decision: that is a failure, never a (re)start
    word, action, reason = run_read_status(tmp_path / "run", python="false")
    assert (word, action) == ("UNREADABLE", "failed") and "no decision" in reason


@pytest.mark.parametrize("name", ["scripts/local_loop.sh", "slurm/resume_chain.sh", "k8s/job.yaml"])
def test_a_template_without_its_lib_fails_with_one_line_and_trains_nothing(tmp_path, name):
    home = tmp_path / "home"  # a GPT_SIMPLE_HOME that lacks scripts/template_lib.sh
    home.mkdir()
    bin_dir = tmp_path / "bin"  # stand-ins that record any call: nothing may be submitted or run
    bin_dir.mkdir()
    for tool in ("sbatch", "scontrol", "squeue", "scancel", "srun"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho {tool} >>"{tmp_path}/calls"\n')
        (bin_dir / tool).chmod(0o755)
    script = ROOT / name
    if name.startswith("k8s/"):
        script = tmp_path / "entrypoint.sh"
        script.write_text(templates()[name])
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "GPT_SIMPLE_HOME": str(home),
           "GPT_SIMPLE_OUTPUT_DIR": str(tmp_path / "run"), "PYTHON": "false", "SLURM_JOB_ID": "7",
           "GPT_SIMPLE_CHAIN_SCRIPT": str(script), "GPT_SIMPLE_TERMINATION_LOG": str(tmp_path / "termination-log"),
           "GPT_SIMPLE_FAILED_EXIT_CODE": "3"}
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    output = (r.stdout + r.stderr).splitlines()
    assert r.returncode == (3 if name.startswith("k8s/") else 1), output
    assert len(output) == 1 and "cannot load" in output[0] and LIB in output[0], output
    assert not (tmp_path / "calls").exists(), (tmp_path / "calls").read_text()
