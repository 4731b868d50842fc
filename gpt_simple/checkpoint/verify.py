"""`gpt-simple verify PATH`: check a run's committed checkpoints (or one checkpoint) against the CRC-32 checksums
recorded at their commit, without loading anything into a model or joining a process group.

Exit 0: every checkpoint verified (or saved before checksums existed, which is said); 1: at least one damaged
(the file named); 2: PATH is neither a run folder, a checkpoints folder nor a committed checkpoint.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gpt_simple.checkpoint.files import (CheckpointError, committed_info, list_committed, read_checksums,
                                         verify_files)


def checkpoints_under(path: Path):
    """The committed checkpoints PATH names: itself, those of its checkpoints/ folder, or those it holds."""
    info = committed_info(path)
    if info is not None:
        return [info]
    for root in (path / "checkpoints", path):
        found = list_committed(root)
        if found:
            return found
    return []


def verify_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpt-simple verify",
                                     description="Check checkpoints against the checksums recorded at commit.")
    parser.add_argument("path", help="a run's output_dir, its checkpoints/ folder, or one checkpoint directory")
    args = parser.parse_args(argv)
    path = Path(args.path)
    if not path.is_dir():
        print(f"error: {path}: no such directory", file=sys.stderr)
        return 2
    found = checkpoints_under(path)
    if not found:
        print(f"error: {path}: no committed checkpoint there", file=sys.stderr)
        return 2
    damaged = 0
    for info in found:
        start = time.perf_counter()
        try:
            expected = read_checksums(info.path)
            if expected is None:
                print(f"{info.name}: no checksums (saved before they were recorded): not verified")
                continue
            verify_files(info.path, expected)
        except CheckpointError as e:
            damaged += 1
            print(f"{info.name}: DAMAGED: {e}")
            continue
        size = sum(v.get("bytes", 0) for v in expected.values())
        print(f"{info.name}: ok ({len(expected)} files, {size / 2**20:.1f} MB, {time.perf_counter() - start:.2f}s)")
    if damaged:
        print(f"error: {damaged} of {len(found)} checkpoint(s) damaged; a resume falls back past them",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(verify_main(sys.argv[1:]))
