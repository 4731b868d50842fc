"""What a failed load was (gpt_simple/checkpoint/failures.py) and what the loader does with each class, in this
process on real checkpoint files. The read itself is made to fail here; the e2e tests fail it for real
(tests/e2e/test_no_silent_paths.py: EIO from the kernel, a flipped bit)."""
from __future__ import annotations

import errno
import pickle

import pytest
import torch
from torch.distributed.checkpoint import CheckpointException

from gpt_simple.checkpoint import CheckpointError, list_committed
from gpt_simple.checkpoint import loader as loader_module
from gpt_simple.checkpoint.failures import BUG, DAMAGE, ENVIRONMENT, LoadUnavailable, classify
from helpers.checkpoint import flip_tensor_byte, tiny_trained_manager


def test_classes_of_real_exceptions():
    assert classify(None) == 0
    assert classify(CheckpointError("checksum mismatch")) == DAMAGE
    assert classify(FileNotFoundError(errno.ENOENT, "gone")) == DAMAGE
    assert classify(pickle.UnpicklingError("bad")) == DAMAGE and classify(EOFError()) == DAMAGE
    assert classify(OSError(errno.EIO, "Input/output error")) == ENVIRONMENT
    assert classify(PermissionError(errno.EACCES, "denied")) == ENVIRONMENT
    assert classify(MemoryError()) == ENVIRONMENT and classify(TimeoutError()) == ENVIRONMENT
    assert classify(torch.OutOfMemoryError("CUDA out of memory")) == ENVIRONMENT
    assert classify(RuntimeError("Connection reset by peer")) == ENVIRONMENT  # a lost peer mid-load
    assert classify(TypeError("unexpected keyword")) == BUG
    assert classify(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) == BUG
    # DCP's wrapper: the highest class among the ranks' causes (an environment failure hides nothing)
    wrapped = CheckpointException("load", {0: (EOFError(), None), 1: (OSError(errno.EIO, "io"), None)})
    assert classify(wrapped) == ENVIRONMENT


@pytest.fixture
def saved(tmp_path):
    mgr, _, _ = tiny_trained_manager(tmp_path)
    mgr.save(1, "final")
    return mgr, list_committed(mgr.root)[-1]


def failing_read(monkeypatch, error: BaseException) -> None:
    def read(*args, **kwargs):
        raise error
    monkeypatch.setattr(loader_module.dcp, "load", read)


def test_an_unexplained_read_failure_on_intact_files_is_a_bug_and_touches_nothing(saved, monkeypatch):
    mgr, info = saved
    failing_read(monkeypatch, RuntimeError("something in the reader"))
    with pytest.raises(RuntimeError, match="not damage .its files verify.") as e:
        mgr.load_latest([info])
    assert "something in the reader" in str(e.value)
    assert [c.name for c in list_committed(mgr.root)] == [info.name] and mgr.quarantined() == []


def test_the_same_failure_on_files_the_checksums_refuse_is_damage(saved, monkeypatch):
    mgr, info = saved
    flip_tensor_byte(info.path)
    failing_read(monkeypatch, RuntimeError("something in the reader"))
    with pytest.raises(CheckpointError, match="no checkpoint .* could be loaded") as e:
        mgr.load_latest([info])
    (name, why), = e.value.failures
    assert name == info.name and "checksum mismatch" in why


def test_an_environment_failure_is_transient_and_touches_nothing(saved, monkeypatch):
    mgr, info = saved
    failing_read(monkeypatch, OSError(errno.ESTALE, "Stale file handle"))
    with pytest.raises(LoadUnavailable, match="could not be read .*Stale file handle.*left as it is"):
        mgr.load_latest([info])
    assert [c.name for c in list_committed(mgr.root)] == [info.name] and mgr.quarantined() == []
