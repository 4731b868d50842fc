"""Checksums written at the commit and verified at the load; the disk-space warning. In process, no subprocesses.
(The measured save budget of the stop decision is the clock's: tests/unit/test_clock.py.)"""
from __future__ import annotations

import json
import shutil
import zlib

import pytest

from gpt_simple.checkpoint import CheckpointError, list_committed
from gpt_simple.checkpoint.files import (CHECKSUM_BLOCK, CHECKSUMS, META, ChecksumMismatch, checkpoint_files,
                                         file_checksum, read_checksums, verify_checkpoint, verify_files)
from gpt_simple.checkpoint.verify import verify_main
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


def format_1(meta: dict) -> dict:
    """meta.json as the first layout wrote it (every part's fields at the top level, no "format"): what read_meta
    upgrades (checkpoint/files.py)."""
    run, train, model = meta.get("run") or {}, meta.get("train") or {}, meta.get("model") or {}
    old = {"step": meta["step"], "kind": meta["kind"], "saved_at": meta["saved_at"], "tokens": train.get("tokens"),
           "config": run.get("config"), "world_size": run.get("world_size"), "tokenizer": run.get("tokenizer"),
           "data": meta.get("data"), **model}
    return old


def test_only_a_checkpoint_older_than_checksums_loads_without_them_and_verification_can_be_off(tmp_path):
    """A checkpoint of the current format without CHECKSUMS is damage (an incomplete copy, an altered folder); one
    written in the format before checksums existed loads, unchecked, and says so."""
    mgr, model, _ = tiny_trained_manager(tmp_path)
    mgr.save(1, "final")
    ckpt = list_committed(mgr.root)[-1]
    (ckpt.path / CHECKSUMS).unlink()
    assert verify_checkpoint(ckpt.path) is False
    with pytest.raises(CheckpointError, match=f"no {CHECKSUMS} .*format 2"):
        mgr.load(ckpt)
    meta = json.loads((ckpt.path / META).read_text())
    (ckpt.path / META).write_text(json.dumps(format_1(meta)))  # as saved before checksums existed
    assert mgr.unchecked is None
    mgr.load(ckpt)
    assert mgr.unchecked == "checkpoint step-1-final predates checksums (format 1): loaded without verifying its files"

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
    monkeypatch.setattr("gpt_simple.checkpoint.saver.write_durable", no_space)
    with pytest.raises(CheckpointError) as e:
        mgr.save(2, "final")
    message = str(e.value)
    assert "saving step-2-final failed" in message and "No space left" in message and "free" in message
    assert "\n" not in message and "newest: step-1-final" in message
    assert sorted(p.name for p in mgr.root.iterdir()) == ["step-1-final"]


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
