"""Checkpointing in this process, on real files: discovery, start-up clean-up, retention, tied weights.
(Real train.py / torchrun runs, and the malicious-pickle test with its child process: e2e/test_checkpoint.py.)"""
import threading
from pathlib import Path

import pytest
import torch

from gpt_simple.checkpoint import COMMITTED, CheckpointManager, list_committed
from helpers.checkpoint import tiny_trained_manager


# -- in this process, on real files ------------------------------------------------------------------------------
def fake_checkpoint(root: Path, name: str, commit: bool = True) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "meta.json").write_text("{}")
    if commit:
        (path / COMMITTED).write_text("{}")
    return path


def test_discovery_orders_by_step_and_ignores_what_is_not_committed(tmp_path):
    for name in ("step-10", "step-4-final", "step-8-shutdown", "step-8", "step-8-final", "corrupt-step-12",
                 "step-x"):
        fake_checkpoint(tmp_path, name)
    fake_checkpoint(tmp_path, "step-20", commit=False)
    fake_checkpoint(tmp_path, ".tmp-step-30")
    # by step; a -final at a lower step (max_steps raised since) never beats a newer step; at one step
    # periodic < shutdown < final
    assert [c.name for c in list_committed(tmp_path)] == \
        ["step-4-final", "step-8", "step-8-shutdown", "step-8-final", "step-10"]


def test_start_up_removes_partial_saves_only(tmp_path):
    root = tmp_path / "checkpoints"
    keep = [fake_checkpoint(root, n) for n in ("step-2", "step-4-final")]
    fake_checkpoint(root, "step-6", commit=False)       # killed between writing and the commit marker
    fake_checkpoint(root, ".tmp-step-8")                # killed mid-write
    fake_checkpoint(root, ".trash-step-1-0123abcd")     # killed while retention was deleting
    (root / ".tmp-step-10").write_text("a stray file, not a directory")
    mgr = CheckpointManager(root, {}, torch.device("cpu"), rank=0)
    assert sorted(mgr.clean_partial()) == [".tmp-step-10", ".tmp-step-8", ".trash-step-1-0123abcd", "step-6"]
    assert sorted(p.name for p in root.iterdir()) == sorted(p.name for p in keep)


def retained(tmp_path, steps, k, every, just=None) -> list[str]:
    root = tmp_path / "checkpoints"
    for s in steps:
        fake_checkpoint(root, s)
    mgr = CheckpointManager(root, {}, torch.device("cpu"), rank=0, keep_last_k=k, keep_milestone_every=every)
    mgr._apply_retention(keep=root / just if just else None)
    for t in threading.enumerate():
        if t.name == "checkpoint-retention":
            t.join()
    assert not [p for p in root.iterdir() if p.name.startswith(".trash-")]  # deleted, not only moved aside
    return [c.name for c in list_committed(root)]


def test_retention_rules(tmp_path):
    steps = ["step-2", "step-4", "step-6", "step-8", "step-10-shutdown", "step-12"]
    assert retained(tmp_path / "a", steps, k=2, every=0) == ["step-10-shutdown", "step-12"]
    assert retained(tmp_path / "b", steps, k=2, every=4) == ["step-4", "step-8", "step-10-shutdown", "step-12"]
    assert retained(tmp_path / "c", steps, k=0, every=4) == steps  # 0 keeps everything
    # the newest is kept even with k = 1 and a milestone that is not it; a save just committed after resuming
    # an older checkpoint (so that it sorts below newer ones) is never deleted by its own retention pass
    assert retained(tmp_path / "d", steps, k=1, every=5) == ["step-10-shutdown", "step-12"]
    assert retained(tmp_path / "e", steps, k=1, every=0, just="step-6") == ["step-6", "step-12"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_tied_weight_is_saved_once_and_stays_tied_after_loading(tmp_path):
    from gpt_simple.checkpoint import read_dcp_metadata, read_meta
    mgr, model, cfg = tiny_trained_manager(tmp_path)
    mgr.save(1)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    keys = read_dcp_metadata(mgr.last_committed.path).state_dict_metadata
    assert "model.tok_emb.weight" in keys and "model.head.weight" not in keys
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    mgr.load(mgr.last_committed)
    assert model.head.weight is model.tok_emb.weight
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert read_meta(mgr.last_committed.path)["model"]["arch_hash"] == cfg.arch_hash()
