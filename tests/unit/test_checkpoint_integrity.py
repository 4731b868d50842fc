"""Checksums written at the commit and verified at the load; the measured save budget of the stop decision; the
disk-space warning. In process, no subprocesses."""
from __future__ import annotations

import json
import shutil
import zlib

import pytest

from gpt_simple.checkpoint import CheckpointError, list_committed
from gpt_simple.checkpoint.files import (CHECKSUM_BLOCK, CHECKSUMS, ChecksumMismatch, checkpoint_files,
                                         file_checksum, read_checksums, verify_checkpoint, verify_files)
from gpt_simple.checkpoint.verify import verify_main
from gpt_simple.shutdown import SAVE_MARGIN, Deadline, StopFlags, StopPolicy
from helpers.checkpoint import flip_tensor_byte, tiny_trained_manager


def test_file_checksum_is_crc32_per_block(tmp_path):
    f = tmp_path / "x"
    payload = bytes(range(256)) * (CHECKSUM_BLOCK // 256) + b"tail"  # two blocks, hashed by two threads
    f.write_bytes(payload)
    assert file_checksum(f) == {"bytes": len(payload), "crc32": [f"{zlib.crc32(payload[:CHECKSUM_BLOCK]):08x}",
                                                                 f"{zlib.crc32(b'tail'):08x}"]}
    (tmp_path / "empty").write_bytes(b"")
    assert file_checksum(tmp_path / "empty") == {"bytes": 0, "crc32": ["00000000"]}


def test_a_commit_records_every_file_and_a_load_verifies_them(tmp_path):
    mgr, model, _ = tiny_trained_manager(tmp_path)
    mgr.save(1, "periodic")
    mgr.save(2, "final")
    ckpt = list_committed(mgr.root)[-1].path
    recorded = read_checksums(ckpt)
    assert set(recorded) == set(checkpoint_files(ckpt)) >= {"meta.json", ".metadata", "__0_0.distcp"}
    assert not list(ckpt.glob(".checksums-rank-*"))  # the ranks' fragments were merged
    assert json.loads((ckpt / CHECKSUMS).read_text())["algorithm"] == "crc32"
    assert verify_checkpoint(ckpt) is True

    assert flip_tensor_byte(ckpt) == "__0_0.distcp"
    with pytest.raises(ChecksumMismatch) as e:
        verify_checkpoint(ckpt)
    assert e.value.file == "__0_0.distcp" and "checksum mismatch" in str(e.value)
    with pytest.raises(CheckpointError, match="__0_0.distcp"):
        mgr.load(list_committed(mgr.root)[-1])
    info, failures = mgr.load_latest(list_committed(mgr.root))
    assert info.step == 1 and failures[0][0] == "step-2-final" and "__0_0.distcp" in failures[0][1]


def test_size_change_and_missing_file_are_named(tmp_path):
    mgr, _, _ = tiny_trained_manager(tmp_path)
    mgr.save(1, "final")
    ckpt = list_committed(mgr.root)[-1].path
    expected = read_checksums(ckpt)
    with open(ckpt / "meta.json", "a") as f:
        f.write(" ")
    with pytest.raises(ChecksumMismatch, match="meta.json.*bytes"):
        verify_files(ckpt, expected)
    (ckpt / "rng").mkdir(exist_ok=True)
    (ckpt / ".metadata").unlink()
    with pytest.raises(ChecksumMismatch) as e:
        verify_files(ckpt, expected, [".metadata"])
    assert e.value.file == ".metadata"


def test_a_checkpoint_without_checksums_still_loads_and_verification_can_be_off(tmp_path):
    mgr, model, _ = tiny_trained_manager(tmp_path)
    mgr.save(1, "final")
    ckpt = list_committed(mgr.root)[-1]
    (ckpt.path / CHECKSUMS).unlink()  # as saved before checksums existed
    assert verify_checkpoint(ckpt.path) is False
    mgr.load(ckpt)

    mgr.save(2, "final")
    ckpt = list_committed(mgr.root)[-1]
    flip_tensor_byte(ckpt.path)
    mgr.verify = False
    mgr.load(ckpt)  # not checked: loads whatever the bytes say


def test_a_garbled_checksums_file_is_damage(tmp_path):
    mgr, _, _ = tiny_trained_manager(tmp_path)
    mgr.save(1, "final")
    ckpt = list_committed(mgr.root)[-1].path
    (ckpt / CHECKSUMS).write_text("{nope")
    with pytest.raises(CheckpointError, match="unreadable checksums"):
        read_checksums(ckpt)


def test_verify_command(tmp_path, capsys):
    mgr, _, _ = tiny_trained_manager(tmp_path)
    mgr.save(1, "periodic")
    mgr.save(2, "final")
    assert verify_main([str(tmp_path)]) == 0
    assert "step-1: ok" in capsys.readouterr().out
    flip_tensor_byte(mgr.root / "step-2-final")
    assert verify_main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "step-2-final: DAMAGED" in out and "__0_0.distcp" in out
    assert verify_main([str(tmp_path / "nowhere")]) == 2


def test_space_warning_has_figures_and_is_said_once(tmp_path, monkeypatch):
    mgr, _, _ = tiny_trained_manager(tmp_path)
    mgr.save(1, "final")
    need = mgr.last_bytes
    assert need and mgr.space_warning() is None
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 * need, 10 * need, need // 2))
    warning = mgr.space_warning()
    assert warning and "MB" in warning and "free" in warning
    assert mgr.space_warning() is None  # once, until it fits again


def test_a_save_that_fails_removes_its_partial_and_keeps_the_committed(tmp_path, monkeypatch):
    mgr, _, _ = tiny_trained_manager(tmp_path)
    mgr.save(1, "final")

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("gpt_simple.checkpoint.manager.write_durable", no_space)
    with pytest.raises(CheckpointError) as e:
        mgr.save(2, "final")
    message = str(e.value)
    assert "saving step-2-final failed" in message and "No space left" in message and "free" in message
    assert "\n" not in message and "newest: step-1-final" in message
    assert sorted(p.name for p in mgr.root.iterdir()) == ["step-1-final"]


# -- the measured save budget ---------------------------------------------------------------------------------------
def policy(tmp_path, reserve: float, left: float = 100.0) -> StopPolicy:
    return StopPolicy(tmp_path, Deadline(1000.0 + left, "test", []), reserve, StopFlags())


def test_the_budget_is_the_larger_of_the_reserve_and_the_measured_save(tmp_path):
    p = policy(tmp_path, reserve=5)
    assert p.reserve_seconds() == 5
    assert p.record_save(2.0, asynchronous=False) is None  # 3 s with the margin: the reserve stays
    warning = p.record_save(10.0, asynchronous=False)
    assert warning and "walltime_reserve_seconds = 5" in warning
    assert p.reserve_seconds() == SAVE_MARGIN * 10
    assert p.record_save(20.0, asynchronous=False) is None  # warned once
    # votes: stop once the deadline is within the budget plus a step
    assert not p.votes(1.0, now=1000.0 + 100 - SAVE_MARGIN * 20 - 1.5).deadline
    assert p.votes(1.0, now=1000.0 + 100 - SAVE_MARGIN * 20 - 0.5).deadline


def test_an_async_save_in_flight_adds_what_it_still_needs(tmp_path):
    p = policy(tmp_path, reserve=1)
    p.record_save(4.0, asynchronous=True)  # no sync save measured yet: the async total stands in
    assert p.reserve_seconds() == SAVE_MARGIN * 4
    p.save_started(asynchronous=True, now=500.0)
    assert p.reserve_seconds(save_in_flight=True, now=501.0) == SAVE_MARGIN * 4 + SAVE_MARGIN * 4 - 1.0
    assert p.reserve_seconds(save_in_flight=True, now=600.0) == SAVE_MARGIN * 4  # overdue: nothing extra
    assert p.reserve_seconds(save_in_flight=False, now=501.0) == SAVE_MARGIN * 4
    p.record_save(2.0, asynchronous=False)  # a synchronous save measured: it is what the shutdown save costs
    assert p.save_budget() == SAVE_MARGIN * 2


def test_no_deadline_no_warning(tmp_path):
    p = StopPolicy(tmp_path, Deadline(None, "none", []), 1.0, StopFlags())
    assert p.record_save(100.0, asynchronous=False) is None
    assert not p.votes(1.0).deadline


def test_a_resumed_launch_starts_with_the_previous_launchs_measurement(tmp_path):
    p = policy(tmp_path, reserve=1)
    warning = p.carry_over(4.0, 6.0)  # run_state.json's save_s of the launch before
    assert warning and "previous launch measured a save of 4.0s" in warning
    assert p.save_budget() == SAVE_MARGIN * 4  # from the first step, before this launch has saved
    assert p.record_save(2.0, asynchronous=False) is None  # said once per launch
    assert p.save_budget() == max(1, SAVE_MARGIN * 2)  # this launch's own measurement replaces it
    assert p.measured() == {"sync": 2.0, "async": 6.0}
    assert policy(tmp_path, reserve=10).carry_over(4.0, 0.0) is None  # within the reserve: nothing to say
    fresh = policy(tmp_path, reserve=1)
    assert fresh.carry_over(0.0, 0.0) is None and fresh.save_budget() == 1  # nothing measured before


# -- export and generate check the checksums as training's load does ------------------------------------------------
def test_export_and_generate_refuse_a_damaged_checkpoint_naming_the_file(tmp_path, capsys):
    from gpt_simple.export import export_main
    from gpt_simple.generate import generate_main
    mgr, _, _ = tiny_trained_manager(tmp_path)
    mgr.save(1, "final")
    ckpt = mgr.root / "step-1-final"
    assert export_main([str(ckpt), str(tmp_path / "ok"), "--no-hf"]) == 0
    capsys.readouterr()
    flip_tensor_byte(ckpt)
    for command in (lambda: export_main([str(tmp_path), str(tmp_path / "out")]),
                    lambda: generate_main(["--checkpoint", str(ckpt), "--tokenizer", "byte"])):
        assert command() == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "__0_0.distcp: checksum mismatch" in err[0], err
    assert not (tmp_path / "out").exists()  # nothing exported
    assert export_main([str(ckpt), str(tmp_path / "out"), "--no-verify", "--no-hf"]) == 0  # the switch, as asked
