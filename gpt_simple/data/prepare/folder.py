"""The build folder DATA/.NAME.tmp-PID: where a bucket is written, and what lets a rerun continue a killed build.

Readers skip hidden folders, so a bucket under construction is never read. Next to the shards it holds
  .lock            locked (POSIX lock) by the building process for as long as it lives: the kernel drops the lock
                   when the process dies, however it dies, so a lock that can be taken marks a dead build;
  .plan.json       what is being built (bucket, tokenizer, options, and a digest of the input files' names,
                   sizes and modification times): only a build of the same plan is continued;
  .progress.json   rewritten atomically (temporary file, fsync, rename) each time a shard is finished: how many
                   shards are complete, where in the input the next one starts, and the counts so far;
  .holdout/        the validation candidates (holdout.py) as of each record, in a file the record names.
A new build first looks for a dead build of the same plan and takes it over (renaming it to its own PID);
shards past the recorded ones, and the unfinished one, are deleted and written again. A dead build of another
plan is deleted: nothing could continue it.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from gpt_simple.data.shards import Shard, ShardError
from gpt_simple.fileio import fsync_file, write_atomic

try:
    import fcntl
except ImportError:  # not POSIX: builds are not shared or continued
    fcntl = None

LOCK, PLAN, PROGRESS = ".lock", ".plan.json", ".progress.json"
HOLDOUT_DIR = ".holdout"   # the validation candidates as of the last record (holdout.py)


def _lock(path: Path, create: bool) -> int | None:
    """An open descriptor holding the lock on path, or None if a live process holds it (or it is missing)."""
    if fcntl is None:
        return os.open(path, os.O_RDWR | os.O_CREAT) if create else None
    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0))
    except OSError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _shard_files_ok(folder: Path, shards: int) -> bool:
    try:
        for i in range(shards):
            Shard(folder / f"shard-{i:05d}.idx")
    except ShardError:
        return False
    return True


class BuildFolder:
    """This process's build folder for one bucket: a dead build of the same plan taken over, or a new one."""

    def __init__(self, out: Path, bucket: str, plan: dict):
        self.path = out / f".{bucket}.tmp-{os.getpid()}"
        self.plan = plan
        self.progress: dict | None = None   # the adopted build's last record
        self.lock: int | None = None
        if not self._adopt(out, bucket):
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir(parents=True)
            self.lock = _lock(self.path / LOCK, create=True)
            # Written after the lock is held: a folder with a plan is locked until its owner dies.
            # sync_dir: the rename itself survives a power loss, since a resumed build trusts this record
            write_atomic(self.path / PLAN, json.dumps(plan, indent=1), sync_dir=True)

    def _adopt(self, out: Path, bucket: str) -> bool:
        if fcntl is None or not out.is_dir():
            return False
        best = None   # (shards, folder, lock, progress)
        for folder in sorted(out.glob(f".{bucket}.tmp-*")):
            if not (folder / PLAN).is_file():
                continue
            lock = _lock(folder / LOCK, create=False)
            if lock is None:
                continue   # its owner is alive (or it is not ours to judge)
            try:
                same = json.loads((folder / PLAN).read_text()) == self.plan
                progress = json.loads((folder / PROGRESS).read_text()) if (folder / PROGRESS).exists() else None
            except (OSError, ValueError):
                same, progress = False, None
            shards = progress["shards"] if progress else 0
            if same and _shard_files_ok(folder, shards) and (best is None or shards > best[0]):
                if best is not None:
                    self._drop(best[1], best[2])
                best = (shards, folder, lock, progress)
            else:
                self._drop(folder, lock)
        if best is None:
            return False
        shards, folder, self.lock, self.progress = best
        if folder != self.path:   # this process's own folder, when an earlier build in it was interrupted
            shutil.rmtree(self.path, ignore_errors=True)
            os.rename(folder, self.path)
        keep = {LOCK, PLAN, PROGRESS, HOLDOUT_DIR} | {f"shard-{i:05d}.{ext}" for i in range(shards)
                                                     for ext in ("bin", "idx")}
        for entry in self.path.iterdir():   # the unfinished shard, and any shard after the record
            if entry.name in keep:
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        return True

    @staticmethod
    def _drop(folder: Path, lock: int) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(lock)

    @property
    def shards(self) -> int:
        return self.progress["shards"] if self.progress else 0

    def record(self, progress: dict, finished_shard: Path) -> None:
        """A shard is complete: make it durable, then say so (a crash between the two redoes that shard)."""
        for ext in (".bin", ".idx"):
            fsync_file(finished_shard.with_name(finished_shard.name + ext))
        write_atomic(self.path / PROGRESS, json.dumps(progress), sync_dir=True)
        self.progress = progress

    def finish(self) -> None:
        """Drop the control files before the folder becomes the bucket: the plan first, so that from here on
        no other process takes this folder for a build to continue."""
        for name in (PLAN, PROGRESS, LOCK):
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / HOLDOUT_DIR, ignore_errors=True)
        self.release()

    def release(self) -> None:
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None

    def discard(self) -> None:
        self.release()
        shutil.rmtree(self.path, ignore_errors=True)
