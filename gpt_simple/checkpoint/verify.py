"""`gpt-simple verify PATH`: check a run's committed checkpoints (or one checkpoint) against the CRC-32 checksums
recorded at their commit, and their digest chain (checkpoint/chain.py) against the save events of the run's
events.jsonl, without loading anything into a model or joining a process group. `--replay K` instead trains K
steps from a checkpoint and compares them with the run's records (gpt_simple/replay.py; the CLI hands it in).

Exit 0: every checkpoint verified (or saved before checksums / the chain existed, which is said); 1: at least one
damaged (the file named) or not one this run committed (named); 2: PATH is neither a run folder, a checkpoints
folder nor a committed checkpoint.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gpt_simple.checkpoint.chain import GENESIS, chain_digest, content_digest, read_link
from gpt_simple.checkpoint.files import (COMMITTED, CheckpointError, committed_info, list_committed, read_checksums,
                                         verify_files)
from gpt_simple.journal import events
from gpt_simple.run_dir import RunDir, read_jsonl


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt-simple verify",
                                     description="Check checkpoints against the checksums and the digest chain "
                                                 "recorded at commit; with --replay, retrain K steps from one and "
                                                 "compare them with the run's records.")
    parser.add_argument("path", help="a run's output_dir, its checkpoints/ folder, or one checkpoint directory "
                                     "(--replay: a run's output_dir)")
    parser.add_argument("--replay", type=int, metavar="K",
                        help="train K steps from a committed checkpoint in a scratch folder and compare losses, "
                             "gradient norms and evaluations step by step with the run's metrics.jsonl")
    parser.add_argument("--from", dest="start", metavar="step-N",
                        help="--replay: the checkpoint to start from (default: the newest committed one)")
    parser.add_argument("--scratch", metavar="DIR",
                        help="--replay: an empty or new folder to train in (kept); default: a temporary one "
                             "(removed). Across nodes it must be on storage every node sees")
    parser.add_argument("--tol", type=float, default=0.0,
                        help="--replay: relative tolerance; 0 (the default) requires every value to be equal")
    return parser


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


def recorded_saves(path: Path) -> dict[str, dict] | None:
    """{digest: save event} of the run whose folder PATH is (or holds PATH), from its events.jsonl; None when PATH
    is not inside a run folder (then only each checkpoint's own link is checked)."""
    for run in (path, path.parent, path.parent.parent):
        if RunDir(run).events.exists():
            saves = events.records_of(read_jsonl(RunDir(run).events), events.Save)
            return {e["digest"]: e for e in saves if e.get("digest")}
    return None


def check_link(info, expected: dict, recorded: dict[str, dict] | None) -> tuple[str | None, str]:
    """(why the checkpoint is not one this run committed, or None; the chain's words for its line)."""
    link = read_link(info.path / COMMITTED)
    if link is None:
        return None, "predates the digest chain"
    own = link.digest[:12]
    if chain_digest(link.previous_digest, content_digest(expected)) != link.digest:
        return f"its checksums are not those its commit recorded (chain {own}): replaced or rewritten", own
    if recorded is None:
        return None, f"chain {own} (self-consistent; no events.jsonl to check it against)"
    event = recorded.get(link.digest)
    if event is None:
        return (f"not a checkpoint this run committed: no save in events.jsonl records its digest {own} "
                f"(copied in from another run?)"), own
    if event.get("checkpoint") != info.name:
        return f"holds what this run committed as {event.get('checkpoint')} (renamed or reordered)", own
    if link.previous_digest != GENESIS and link.previous_digest not in recorded:
        return f"its predecessor {link.previous} (chain {link.previous_digest[:12]}) is not this run's", own
    after = f" after {link.previous}" if link.previous else " (start)"
    return None, f"chain {own} ok{after}"


def verify_main(argv: list[str], replay=None) -> int:
    args = build_parser().parse_args(argv)
    path = Path(args.path)
    if args.replay is not None:
        if replay is None:
            print("error: --replay: run it as `gpt-simple verify RUN_DIR --replay K`", file=sys.stderr)
            return 2
        return replay(args)
    for option in ("start", "scratch"):
        if getattr(args, option) is not None:
            print(f"error: --{'from' if option == 'start' else option} needs --replay K", file=sys.stderr)
            return 2
    if not path.is_dir():
        print(f"error: {path}: no such directory", file=sys.stderr)
        return 2
    found = checkpoints_under(path)
    if not found:
        print(f"error: {path}: no committed checkpoint there", file=sys.stderr)
        return 2
    return report(found, recorded_saves(path))


def report(found: list, recorded: dict[str, dict] | None) -> int:
    """One line per checkpoint: its files against their checksums, its link in the chain. Exit 1 for any bad."""
    damaged, foreign, predating = 0, [], 0
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
        why, chain = check_link(info, expected, recorded)
        predating += chain == "predates the digest chain"
        size = sum(v.get("bytes", 0) for v in expected.values())
        if why:
            foreign.append(info.name)
            print(f"{info.name}: NOT THIS RUN'S: {why}")
            continue
        print(f"{info.name}: ok ({len(expected)} files, {size / 2**20:.1f} MB, {time.perf_counter() - start:.2f}s); "
              f"{chain}")
    if predating:
        print(f"warning: {predating} checkpoint(s) predate the digest chain (saved before it was recorded): "
              f"only their checksums are verified", file=sys.stderr)
    if damaged:
        print(f"error: {damaged} of {len(found)} checkpoint(s) damaged; a resume falls back past them",
              file=sys.stderr)
    if foreign:
        print(f"error: {', '.join(foreign)}: not a checkpoint this run committed (see above); move it out of the "
              f"run before resuming", file=sys.stderr)
    return 1 if damaged or foreign else 0


if __name__ == "__main__":
    sys.exit(verify_main(sys.argv[1:]))
