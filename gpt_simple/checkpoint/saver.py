"""Saving and committing: sharded DCP saves (async for periodic ones), the atomic commit with checksums, one-line
save failures that remove their partial, and the disk-space warning.

A save is written as checkpoints/.tmp-NAME and becomes checkpoints/NAME (rename) only after every rank's write
has finished and COMMITTED has been written inside it. Async saves copy the state into reused CPU buffers in a
staging thread while the next forward/backward runs (the optimizer step waits for the copy: before_update), then
DCP writes it from a background thread. A drill (gpt_simple/drill.py) can slow the writes ("save") and the
staging copy ("stage").
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from gpt_simple.checkpoint.files import (CHECKSUM_ALGORITHM, CHECKSUM_BLOCK, CHECKSUM_PART, CHECKSUMS, COMMITTED,
                                         DCP_ERRORS, META, META_FORMAT, TMP_PREFIX, CheckpointError, CheckpointInfo,
                                         checkpoint_files, checkpoint_name, checksum_files, describe_error)
from gpt_simple.checkpoint.chain import make_link
from gpt_simple.checkpoint.retention import Retention
from gpt_simple.drill import Drill
from gpt_simple.fileio import fsync_dir, write_durable
from gpt_simple.runtime import log, one_thread_here


class _Writer(FileSystemWriter):
    """FileSystemWriter (fsyncs every file) that pauses for the drill's "save" before writing. After writing, each
    rank checksums the files it wrote (in the write thread of an async save: off the loop) into a fragment that
    the commit merges into CHECKSUMS.json."""

    def __init__(self, path: str, rank: int, drill: Drill):
        super().__init__(path)
        self.gpt_rank, self.gpt_drill = rank, drill

    def write_data(self, plan, planner):
        one_thread_here()  # an async save writes from DCP's thread
        self.gpt_drill.pause("save")  # a slow filesystem
        future = super().write_data(plan, planner)
        results = future.wait() if hasattr(future, "wait") else future.result()  # resolved: written above
        names = sorted({r.storage_data.relative_path for r in results
                        if hasattr(r.storage_data, "relative_path")})
        write_durable(Path(self.path) / CHECKSUM_PART.format(rank=self.gpt_rank),
                      json.dumps(checksum_files(Path(self.path), names)))
        return future


def _stager_class():
    try:
        from torch.distributed.checkpoint.staging import DefaultStager
    except ImportError:  # torch before DefaultStager: async_save then stages (blocking) with its own copy
        return None

    class _Stager(DefaultStager):
        """DefaultStager that pauses for the drill's "stage" before each staging copy (in the staging thread)."""

        def __init__(self, options, drill: Drill):
            super().__init__(options)
            self.gpt_drill = drill

        def _stage(self, state_dict, **kwargs):
            one_thread_here()
            self.gpt_drill.pause("stage")  # a slow device-to-host copy
            return super()._stage(state_dict, **kwargs)

    return _Stager


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MB"


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


class _Pending:
    def __init__(self, info: CheckpointInfo, tmp: Path, future, started: float, blocked: float,
                 asynchronous: bool, staged=None):
        self.info, self.tmp, self.future, self.started, self.blocked = info, tmp, future, started, blocked
        self.asynchronous = asynchronous
        self.staged = staged  # async saves: a future that resolves once the state is copied to the stager


class Saving(Retention):
    """The manager's saves and commits (a mixin of CheckpointManager); every rank takes part. A commit applies
    retention (Retention)."""

    def _init_saving(self, drill: Drill) -> None:
        self.drill = drill
        self.last_bytes: int | None = None  # size of the newest committed save: what the next one needs
        self._space_warned = False
        self.pending: _Pending | None = None
        self._stager = None

    # -- disk space -------------------------------------------------------------------------------------
    def free_bytes(self) -> int | None:
        try:
            return shutil.disk_usage(self.root if self.root.exists() else self.root.parent).free
        except OSError:
            return None

    def expected_bytes(self) -> int | None:
        """What the next save needs: the size of the last committed checkpoint (this launch's, else the newest
        on disk); None before any."""
        if self.last_bytes is None and self.rank == 0:
            ckpts = self.committed()
            if ckpts:
                try:
                    self.last_bytes = _dir_bytes(ckpts[-1].path)
                except OSError:
                    pass
        return self.last_bytes

    def space_warning(self) -> str | None:
        """A warning with figures when the next save will not fit in the checkpoints folder's free space (rank 0;
        the caller logs it)."""
        if self.rank != 0:
            return None
        need, free = self.expected_bytes(), self.free_bytes()
        short = need is not None and free is not None and free < need
        if not short or self._space_warned:  # once until it fits again
            self._space_warned = short
            return None
        self._space_warned = True
        return (f"the next checkpoint needs about {_mb(need)} (the size of the last one) but {self.root} has "
                f"{_mb(free)} free: the save will fail unless space is freed (lower training.keep_last_k, or move "
                f"the run)")

    # -- saving -----------------------------------------------------------------------------------------
    def _meta(self, step: int, kind: str) -> dict:
        meta = {"format": META_FORMAT, "step": step, "kind": kind, "saved_at": time.time()}
        parts = {name: part.state_dict() for name, part in self._scoped("global").items()}
        parts.update({name: part.manifest() for name, part in self._scoped("sharded").items()})
        clash = set(parts) & set(meta)
        assert not clash, f"checkpoint part names {clash} clash with meta.json's own fields"
        return {**meta, **parts}

    def stager(self):
        """One DCP stager for the run: its CPU staging buffers are allocated once and reused by every save
        (fresh buffers cost page faults on each save); pinned memory and non-blocking copies on CUDA.

        Staging runs in the stager's own thread, overlapping the next step's forward and backward (which read
        the weights but do not change them); before_update() makes the optimizer step wait for it."""
        if self._stager is None and _stager_class() is not None:
            from torch.distributed.checkpoint.staging import StagingOptions
            cuda = self.device.type == "cuda"
            options = StagingOptions(use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=True,
                                     use_non_blocking_copy=cuda)
            self._stager = _stager_class()(options, self.drill)
        return self._stager

    def save(self, step: int, kind: str = "periodic", asynchronous: bool = False) -> dict | None:
        """Start a save of every part at `step`; a synchronous save is committed before returning, and its
        record returned (an asynchronous one's comes from maybe_commit or wait).

        Every rank takes part. A failure on any rank (disk full, permission) raises CheckpointError on every
        rank, leaves the previous checkpoints untouched and the partial directory for the next start to remove.
        """
        if self.pending is not None:
            raise RuntimeError("a save is in flight: wait() for it (and handle its record) first")
        info = CheckpointInfo(self.root / checkpoint_name(step, kind), step, kind)
        tmp = self.root / f"{TMP_PREFIX}{info.name}"
        started = time.perf_counter()
        warning = self.space_warning()
        if warning:
            log.warning(f"before saving {info.name}: {warning}")
        error: BaseException | None = None
        if self.rank == 0:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                for name in self._scoped("rank"):
                    (tmp / name).mkdir()
                write_durable(tmp / META, json.dumps(self._meta(step, kind)))
            except OSError as e:
                error = e
        if self._agree_failed(error):  # also the barrier: the directory exists before any rank writes into it
            self._raise_failed(info, tmp, error)
        future = staged = None
        try:
            for name, part in self._scoped("rank").items():
                write_durable(tmp / name / f"rank-{self.rank}.json", json.dumps(part.state_dict()))
            state, _ = self._tensors()
            writer = _Writer(str(tmp), self.rank, self.drill)
            if asynchronous:
                stager = self.stager()
                response = dcp.async_save(state, storage_writer=writer, **self._scope(),
                                          **({"async_stager": stager} if stager is not None else {}))
                future = getattr(response, "upload_completion", response)
                staged = getattr(response, "staging_completion", None)
            else:
                dcp.save(state, storage_writer=writer, **self._scope())
        except DCP_ERRORS as e:  # every rank must reach the agreement in _commit
            future = e
        self.pending = _Pending(info, tmp, future, started, time.perf_counter() - started, asynchronous, staged)
        self.last_saved_step = step
        return None if asynchronous else self._commit()

    def before_update(self) -> float:
        """Call before anything changes the saved state in place (the optimizer step): waits until the save in
        flight has copied it. The wait counts as that save's blocking time; it is returned, so that the caller's
        own timing (a training step's) does not count it twice."""
        p, waited = self.pending, 0.0
        if p is not None and p.staged is not None:
            if not p.staged.done():
                start = time.perf_counter()
                try:
                    p.staged.result()
                except DCP_ERRORS:  # the write fails too; reported by _commit on every rank
                    pass
                waited = time.perf_counter() - start
                p.blocked += waited
            p.staged = None
        return waited

    def save_in_flight(self) -> bool:
        """This rank's async write is still running (agreed over ranks by the trainer's step agreement)."""
        return bool(self.pending is not None and self.pending.future is not None
                     and hasattr(self.pending.future, "done") and not self.pending.future.done())

    def maybe_commit(self, any_rank_pending: bool) -> dict | None:
        """Commit the save in flight once no rank is still writing it (`any_rank_pending`: pending_vote,
        all-reduced); its record, or None."""
        if self.pending is not None and not any_rank_pending:
            return self._commit()
        return None

    def wait(self) -> dict | None:
        """Block until the save in flight (if any) is written, then commit it; its record, or None. The time
        the caller blocks here counts as that save's blocking time."""
        if self.pending is None:
            return None
        start = time.perf_counter()
        future = self.pending.future
        if future is not None and hasattr(future, "done"):
            try:
                future.result()
            except DCP_ERRORS:  # reported by _commit on every rank
                pass
        self.pending.blocked += time.perf_counter() - start
        return self._commit()

    def _raise_failed(self, info: CheckpointInfo, tmp: Path, error: BaseException | None):
        """Every rank has stopped writing (an agreement came first): rank 0 removes the partial directory, and
        every rank raises one line: which checkpoint, the error, bytes needed against bytes free."""
        reason = describe_error(error) if error else "a write failed on another rank"
        removed = "was removed"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            if tmp.exists():
                removed = "could not be removed (the next start will)"
        if dist.is_initialized():
            dist.barrier(group=self.group)
        need, free = self.expected_bytes(), self.free_bytes()
        space = f"; needs about {_mb(need)}, {_mb(free)} free" if need is not None and free is not None else \
            (f"; {_mb(free)} free" if free is not None else "")
        newest = self.committed()
        kept = f"the committed checkpoints are untouched (newest: {newest[-1].name})" if newest else \
            "no checkpoint was committed before"
        raise CheckpointError(f"saving {info.name} failed ({reason}{space}); {kept}; the partial {tmp.name} "
                              f"{removed}")

    def _commit(self) -> dict:
        """Agree that every rank's write succeeded, then mark and rename (rank 0). Runs in the loop: its time
        counts as blocking. The record's total_s is the save's whole duration, blocking_s the loop's share."""
        commit_start = time.perf_counter()
        p, self.pending = self.pending, None
        error = p.future if isinstance(p.future, BaseException) else (
            p.future.exception() if p.future is not None else None)
        if self._agree_failed(error):
            self._raise_failed(p.info, p.tmp, error)
        size, replaced, link = None, None, None
        if self.rank == 0:
            try:
                files = self._write_checksums(p.tmp)
                size = _dir_bytes(p.tmp)
                before = self.chain
                link = make_link(files, before[1] if before else None, before[0] if before else None)
                write_durable(p.tmp / COMMITTED, json.dumps({"committed_at": time.time(), **link.record()}))
                fsync_dir(p.tmp)
                # the commit protocol is a directory rename: .tmp-NAME becomes NAME whole
                if p.info.path.exists():  # same name saved again (after resuming an older checkpoint)
                    replaced = self._trash_name(p.info.name)
                    os.replace(p.info.path, replaced)
                os.replace(p.tmp, p.info.path)
                fsync_dir(self.root)
            except OSError as e:
                error = e
        if self._agree_failed(error):
            self._raise_failed(p.info, p.tmp, error)
        if self.rank == 0:
            self._apply_retention([replaced] if replaced else [], keep=p.info.path)
        p.blocked += time.perf_counter() - commit_start
        total = time.perf_counter() - p.started
        self.last_committed = p.info
        self.chain = (p.info.name, link) if link is not None else None  # rank 0 keeps the chain
        if size is not None:
            self.last_bytes = size
        record = {"checkpoint": p.info.name, "step": p.info.step, "type": p.info.kind, "async": p.asynchronous,
                  "blocking_s": p.blocked, "total_s": total, "bytes": size,
                  "digest": link.digest if link else None, "previous_digest": link.previous_digest if link else None}
        log.info(f"checkpoint {p.info.name} committed ({'async' if p.asynchronous else 'sync'}: loop blocked "
                 f"{p.blocked:.2f}s, total {total:.2f}s)")
        return record

    def _write_checksums(self, tmp: Path) -> dict[str, dict]:
        """CHECKSUMS.json: every file of the checkpoint. The ranks' fragments cover the tensor files (hashed by
        the write threads); rank 0 hashes the rest (meta.json, per-rank JSON, DCP's .metadata: small)."""
        files: dict[str, dict] = {}
        for part in sorted(tmp.glob(CHECKSUM_PART.format(rank="*"))):
            files.update(json.loads(part.read_text()))
            part.unlink()
        rest = [name for name in checkpoint_files(tmp) if name not in files]
        files.update(checksum_files(tmp, rest))
        write_durable(tmp / CHECKSUMS, json.dumps({"algorithm": CHECKSUM_ALGORITHM, "block_bytes": CHECKSUM_BLOCK,
                                                   "files": files}, sort_keys=True))
        return files

    def abandon(self) -> None:
        """On the way out after a failure: let this rank's write in flight finish (it holds the staged copy, not
        the loop), then remove its partial directory (rank 0) instead of leaving it for the next start. No
        collective: the other ranks may be gone."""
        p, self.pending = self.pending, None
        if p is None:
            return
        if p.future is not None and hasattr(p.future, "result"):
            try:
                p.future.result(timeout=60)  # bounded: with a peer gone its collectives never finish
            except BaseException:  # noqa: BLE001 - a failed or stuck write: the directory goes anyway
                pass
        if self.rank == 0:
            shutil.rmtree(p.tmp, ignore_errors=True)
            log.info(f"removed the partial checkpoint {p.tmp.name} of the save in flight")

    def close(self) -> None:
        self.wait()
        if self._stager is not None:
            self._stager.close()
            self._stager = None
