"""`gpt-simple verify` in this process: the replay's verdict and where the run's records came from
(gpt_simple/replay.py), the digest chain's links (checkpoint/chain.py, checkpoint/verify.py), and the one-line
refusals of bad input. With real training processes: e2e/test_verify.py."""
import json
from pathlib import Path

import pytest

from gpt_simple.checkpoint import COMMITTED, CheckpointInfo
from gpt_simple.checkpoint.chain import GENESIS, Link, chain_digest, content_digest, make_link, read_link
from gpt_simple.checkpoint.verify import check_link, verify_main
from gpt_simple.config import Config, to_toml
from gpt_simple.journal import events as ev
from gpt_simple.replay import Plan, ReplayError, provenance, replay_main, verdict
from gpt_simple.run_dir import RunDir


def fake_run(root: Path, steps=range(1, 9), evals=(6,), launches=((1, 2, None), (2, 2, ("step-4", 4)))) -> RunDir:
    """A run folder without tensors: config.toml, committed step-4 and step-8-final markers, metrics and events."""
    run = RunDir(root)
    root.mkdir(parents=True, exist_ok=True)
    run.config.write_text(to_toml(Config()))
    for name in ("step-4", "step-8-final"):
        (run.checkpoints / name).mkdir(parents=True)
        (run.checkpoints / name / COMMITTED).write_text("{}")
    rows = [{"step": s, "loss": 5.0 - s / 10, "grad_norm": 1.0 + s, "lr": 1e-3, "tokens": s * 64} for s in steps]
    rows += [{"type": "eval", "step": s, "loss": 4.0, "ppl": 54.6, "loss_by_bucket": {"code": 4.0}} for s in evals]
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in sorted(rows, key=lambda r: r["step"])))
    lines = []
    for number, world, resumed in launches:
        lines.append({"event": ev.Launch.kind, "launch": number, "world_size": world, "mesh": [1, world]})
        if resumed:
            lines.append({"event": ev.Resume.kind, "launch": number, "checkpoint": resumed[0], "step": resumed[1]})
        lines.append({"event": ev.Setup.kind, "launch": number})
    run.events.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


def plan_of(run: RunDir, k: int = 3) -> Plan:
    from gpt_simple.replay import plan_replay
    return plan_replay(str(run.path), k, "step-4")


def test_verdict_exact_within_and_differs(tmp_path):
    run = fake_run(tmp_path / "run")
    plan = plan_of(run)
    assert sorted(plan.recorded) == [5, 6, 7] and sorted(plan.evaluations) == [6]
    same = [dict(r) for r in (*plan.recorded.values(), *plan.evaluations.values())]
    assert verdict(plan, same, 0.0) == (0, "exact: 3 logged steps (loss, grad_norm, lr) and 1 evaluation(s) equal")
    near = [dict(r, grad_norm=r["grad_norm"] * (1 + 1e-7)) if r["step"] == 7 and "grad_norm" in r else r
            for r in same]
    code, line = verdict(plan, near, 0.0)
    assert code == 1 and line.startswith("differs from step 7: grad_norm 8.0 (run) vs 8.0000")
    code, line = verdict(plan, near, 1e-6)
    assert code == 0 and line.startswith("within 1e-06: 3 logged steps") and "(grad_norm at step 7)" in line
    bad_eval = [dict(r, loss_by_bucket={"code": 4.5}) if r.get("type") == "eval" else r for r in same]
    assert verdict(plan, bad_eval, 0.0) == (1, "differs from step 6: eval loss code 4.0 (run) vs 4.5 (replay)")
    with pytest.raises(ReplayError, match="the replay logged no step 7"):
        verdict(plan, [r for r in same if r["step"] != 7], 0.0)


def test_the_replay_covers_only_what_the_run_recorded(tmp_path):
    plan = plan_of(fake_run(tmp_path / "run", steps=range(1, 7)), k=20)
    assert (plan.steps, plan.asked, plan.end) == (2, 20, 6)


def test_provenance_says_which_launch_recorded_the_steps(tmp_path):
    """Steps after step-4 were recorded by launch 2, which resumed from it; then by a launch that trained through
    it (resumed from step-2) on another world size."""
    lines, other = provenance(plan_of(fake_run(tmp_path / "a")), 2)
    assert lines == ["the run recorded steps 5-7 in launch 2 (world size 2, mesh [1, 2]), which resumed from "
                     "step-4; the same world size"] and not other
    through = fake_run(tmp_path / "b", launches=((1, 1, None), (2, 2, ("step-2", 2))))
    lines, other = provenance(plan_of(through), 1)
    assert lines == ["the run recorded steps 5-7 in launch 2 (world size 2, mesh [1, 2]), which trained through "
                     "step 4 (it started from step-2); a different world size: replayed on 1"] and other


def test_the_chain_links_each_commit_to_the_one_before():
    files = {"meta.json": {"bytes": 3, "crc32": ["0000abcd"]}}
    first = make_link(files, None, None)
    assert first.previous_digest == GENESIS and first.digest == chain_digest(GENESIS, content_digest(files))
    second = make_link(files, first, "step-2")
    assert second.previous == "step-2" and second.digest == chain_digest(first.digest, content_digest(files))
    assert second.digest != first.digest  # the same content at another place in the chain is another link
    assert content_digest({"b": {"x": 1}, "a": {"y": 2}}) == content_digest({"a": {"y": 2}, "b": {"x": 1}})


def test_check_link_names_what_is_wrong(tmp_path):
    files = {"meta.json": {"bytes": 3, "crc32": ["0000abcd"]}}
    link = make_link(files, None, None)
    ckpt = tmp_path / "step-2"
    ckpt.mkdir()
    (ckpt / COMMITTED).write_text(json.dumps({"committed_at": 0, **link.record()}))
    info = CheckpointInfo(ckpt, 2, "periodic")
    assert read_link(ckpt / COMMITTED) == link
    recorded = {link.digest: {"checkpoint": "step-2"}}
    assert check_link(info, files, recorded) == (None, f"chain {link.digest[:12]} ok (start)")
    assert check_link(info, files, {})[0].startswith("not a checkpoint this run committed")
    assert check_link(info, files, {link.digest: {"checkpoint": "step-4"}})[0] == \
        "holds what this run committed as step-4 (renamed or reordered)"
    other = {"meta.json": {"bytes": 3, "crc32": ["0000abce"]}}
    assert "not those its commit recorded" in check_link(info, other, recorded)[0]
    (ckpt / COMMITTED).write_text(json.dumps({"committed_at": 0}))  # saved before the chain existed
    assert check_link(info, files, recorded) == (None, "predates the digest chain")
    assert isinstance(link, Link)


@pytest.mark.parametrize("argv, message", [
    (["--replay", "0"], "error: --replay: must be >= 1 step, got 0"),
    (["--replay", "3", "--from", "step-99"], "error: --from step-99: no such committed checkpoint in {ckpts} "
                                             "(there: step-4, step-8-final)"),
    (["--replay", "3", "--tol", "-1"], "error: --tol: must be a relative tolerance >= 0, got -1.0"),
    (["--replay", "3", "--from", "step-8-final"], "error: {run}/metrics.jsonl: no step after step-8-final "
                                                  "recorded: nothing to compare a replay with"),
    (["--from", "step-4"], "error: --from needs --replay K"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    run = fake_run(tmp_path / "run")
    assert verify_main([str(run.path), *argv], replay=replay_main) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [message.format(run=run.path, ckpts=run.checkpoints)]


def test_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    (tmp_path / "checkpoints" / "step-2").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-2" / COMMITTED).write_text("{}")
    assert verify_main([str(tmp_path), "--replay", "2"], replay=replay_main) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}/config.toml: missing (not a run folder?)"


def test_the_deterministic_switch():
    """training.deterministic: deterministic kernels, and cuBLAS's workspace setting in place before CUDA starts."""
    import os

    import torch

    from gpt_simple.parallel import make_deterministic
    saved = os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    try:
        make_deterministic()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        if saved is not None:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved


def test_each_commit_chains_to_the_checkpoint_saved_or_loaded_before(tmp_path):
    """The manager's commits: the first starts the chain, the next links to it; after loading an older one the
    next commit links to that; a checkpoint loaded from another run's folder starts a new chain."""
    from gpt_simple.checkpoint import list_committed
    from helpers.checkpoint import tiny_trained_manager
    mgr, _, _ = tiny_trained_manager(tmp_path / "a")
    first = mgr.save(1, "periodic")
    second = mgr.save(2, "periodic")
    links = {c.name: read_link(c.path / COMMITTED) for c in list_committed(mgr.root)}
    assert first["previous_digest"] == GENESIS and second["previous_digest"] == first["digest"]
    assert links["step-2"].previous == "step-1" and links["step-2"].digest == second["digest"]
    mgr.load(list_committed(mgr.root)[0])
    third = mgr.save(3, "final")
    assert third["previous_digest"] == first["digest"]
    other, _, _ = tiny_trained_manager(tmp_path / "b")
    other.load(list_committed(mgr.root)[-1])  # training.resume naming another run's checkpoint
    assert other.save(4, "final")["previous_digest"] == GENESIS
