"""A real `gpt-simple prepare` SIGKILLed mid-run, twice, leaves no bucket a trainer would read; the rerun keeps the
finished shards, redoes the unfinished one and ends with the bucket an uninterrupted run writes, byte for byte,
validation split included."""
from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers.paths import PYTHON

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstd = pytest.importorskip("zstandard")

GPT_SIMPLE = str(Path(PYTHON).with_name("gpt-simple"))
WORDS = ["alpha", "beta", "\u03b3\u03ac\u03bc\u03bc\u03b1", "delta", "\u2713", "epsilon", "zeta"]


def make_inputs(src: Path) -> None:
    """Six files, two of each format, about 12 MB of text."""
    rng = random.Random(0)
    src.mkdir()
    for i in range(6):
        docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 400))) for _ in range(2000)]
        body = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
        if i % 3 == 0:
            (src / f"f{i}.jsonl").write_bytes(body)
        elif i % 3 == 1:
            (src / f"f{i}.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(body))
        else:
            pq.write_table(pa.table({"text": docs}), src / f"f{i}.parquet", row_group_size=400)


def command(src: Path, data: Path, workers: int) -> list[str]:
    return [GPT_SIMPLE, "prepare", str(src), "--out", str(data), "--bucket", "b", "--shard-tokens", "150000",
            "--workers", str(workers), "--val-docs", "300"]


def kill_after(cmd: list[str], data: Path, shards: int) -> int:
    """Start cmd, SIGKILL it once its build has recorded `shards` finished shards; the shards it had."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen, deadline = 0, time.time() + 120
    try:
        while seen < shards:
            assert proc.poll() is None, f"prepare finished before {shards} shards: make the input larger"
            assert time.time() < deadline
            for record in data.glob(".b.tmp-*/.progress.json"):
                try:
                    seen = max(seen, json.loads(record.read_text())["shards"])
                except (OSError, ValueError):
                    pass  # replaced while we read it
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    return seen


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*"))}


def manifest(folder: Path) -> dict:
    m = json.loads((folder / "prepare.json").read_text())
    return {k: v for k, v in m.items() if k not in ("created_at", "seconds", "folder")}


@pytest.mark.slow
def test_a_killed_prepare_continues_to_the_bucket_of_an_uninterrupted_run(tmp_path):
    make_inputs(tmp_path / "src")
    ref = subprocess.run(command(tmp_path / "src", tmp_path / "ref", 1), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    total = len(list((tmp_path / "ref" / "b").glob("*.idx")))
    assert total > 40

    data = tmp_path / "data"
    first = kill_after(command(tmp_path / "src", data, 2), data, 3)
    second = kill_after(command(tmp_path / "src", data, 2), data, first + 8)   # continues, is killed again
    assert first >= 3 and second >= first + 8 and second < total
    assert [p.name for p in data.iterdir() if not p.name.startswith(".")] == []   # no bucket: only a hidden build

    rerun = subprocess.run(command(tmp_path / "src", data, 2), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    kept = re.search(r"(\d+) finished shard\(s\) kept", rerun.stderr)
    assert kept and second <= int(kept.group(1)) < total, rerun.stderr   # (a shard may finish as the kill lands)
    assert [p.name for p in data.iterdir()] == ["b"]   # the build folder became the bucket
    assert shard_bytes(data / "b") == shard_bytes(tmp_path / "ref" / "b")
    # the validation candidates held across the kills were recorded with the shards: the same split
    assert shard_bytes(data / "b" / "val") == shard_bytes(tmp_path / "ref" / "b" / "val")
    assert manifest(data / "b") == manifest(tmp_path / "ref" / "b")
    assert manifest(data / "b")["val_documents"] == 300
    assert sorted(p.name for p in (data / "b").iterdir() if not p.name.startswith("shard-")) == ["prepare.json", "val"]
