"""The CheckpointManager: sharded DCP saves (async for periodic ones), atomic commits, retention, loading with
fallback.

A save is written as checkpoints/.tmp-NAME and becomes checkpoints/NAME (rename) only after every rank's write
has finished and COMMITTED has been written inside it; start-up removes the leftovers of interrupted saves.
Async saves copy the state into reused CPU buffers in a staging thread while the next forward/backward runs (the
optimizer step waits for the copy: before_update), then DCP writes it from a background thread. See
docs/checkpointing.md.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from gpt_simple.checkpoint.files import (CHECKSUM_ALGORITHM, CHECKSUM_BLOCK, CHECKSUM_PART, CHECKSUMS, COMMITTED,
                                         CORRUPT_PREFIX, DCP_ERRORS, META, META_FORMAT, NAME_RE, CheckpointError,
                                         CheckpointInfo,
                                         SafeFileSystemReader, SafeLoadPlanner, checkpoint_files, checkpoint_name,
                                         checksum_files, describe_error, list_committed, read_checksums,
                                         read_dcp_metadata, read_meta, verify_files)
from gpt_simple.config import ConfigError
from gpt_simple.data.curriculum import DataError
from gpt_simple.run_dir import fsync_dir, write_durable
from gpt_simple.runtime import all_reduce_max, log, one_thread_here

# Test and drill knob: every checkpoint write sleeps this long first (a slow filesystem), so a test can stop or
# kill a job while a save is in flight. Unset in production.
SAVE_DELAY_ENV = "GPT_SIMPLE_SAVE_DELAY_S"
# Likewise for the async staging copy (a slow device-to-host copy), to test that no update overlaps it.
STAGE_DELAY_ENV = "GPT_SIMPLE_STAGE_DELAY_S"

# One process saves and loads with no_dist (CheckpointManager.solo); DCP then warns on every call, also from its
# background write thread, that it is "assuming the intent is to save in a single process". It is.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class _Writer(FileSystemWriter):
    """FileSystemWriter (fsyncs every file) with the optional test delay before writing. After writing, each rank
    checksums the files it wrote (in the write thread of an async save: off the loop) into a fragment that the
    commit merges into CHECKSUMS.json."""

    def __init__(self, path: str, rank: int):
        super().__init__(path)
        self.gpt_rank = rank

    def write_data(self, plan, planner):
        one_thread_here()  # an async save writes from DCP's thread
        delay = float(os.environ.get(SAVE_DELAY_ENV) or 0)
        if delay > 0:
            time.sleep(delay)
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
        """DefaultStager with the optional test delay before each staging copy (in the staging thread)."""

        def _stage(self, state_dict, **kwargs):
            one_thread_here()
            delay = float(os.environ.get(STAGE_DELAY_ENV) or 0)
            if delay > 0:
                time.sleep(delay)
            return super()._stage(state_dict, **kwargs)

    return _Stager


def _is_dcp_file(name: str) -> bool:
    """A file DCP writes and reads (shards, .metadata), as opposed to gpt-simple's own JSON."""
    return name.endswith(".distcp") or Path(name).name.startswith(".metadata") or name.endswith(".metadata")


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MB"


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _remove_all(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


class _Pending:
    def __init__(self, info: CheckpointInfo, tmp: Path, future, started: float, blocked: float,
                 asynchronous: bool, staged=None):
        self.info, self.tmp, self.future, self.started, self.blocked = info, tmp, future, started, blocked
        self.asynchronous = asynchronous
        self.staged = staged  # async saves: a future that resolves once the state is copied to the stager


class CheckpointManager:
    """Saves and loads a dict of Stateful parts (see gpt_simple/state.py); owns the checkpoints folder.

    save / maybe_commit / wait return the record of the checkpoint they committed (or None): what to do about
    a commit (events, status, metrics) is the caller's business."""

    def __init__(self, root: Path, parts: dict, device: torch.device, rank: int, keep_last_k: int = 3,
                 keep_milestone_every: int = 0, verify: bool = True):
        self.root, self.parts, self.device, self.rank = Path(root), parts, device, rank
        self.verify = verify  # check a checkpoint's CHECKSUMS before loading it (training.verify_checkpoints)
        self.last_bytes: int | None = None  # size of the newest committed save: what the next one needs
        self._space_warned = False
        self.keep_last_k, self.keep_milestone_every = keep_last_k, keep_milestone_every
        self.pending: _Pending | None = None
        self.last_saved_step: int | None = None
        self.last_committed: CheckpointInfo | None = None
        self.last_save_seconds = 0.0
        self._stager = None
        # Background DCP collectives get their own gloo group so they never interleave with training's.
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        # One process needs no collectives; DCP's plan exchange through gloo would also leave gloo's worker
        # thread with an OpenMP team of its own (see runtime.one_thread_here): slower steps ever after.
        self.solo = not dist.is_initialized() or dist.get_world_size() == 1

    def _scoped(self, scope: str) -> dict:
        return {name: part for name, part in self.parts.items() if part.checkpoint_scope == scope}

    # -- start-up ---------------------------------------------------------------------------------------
    def clean_partial(self) -> list[str]:
        """Remove directories of saves that never committed (killed mid-write); rank 0, before any save."""
        removed = []
        if self.rank == 0 and self.root.is_dir():
            for path in sorted(self.root.iterdir()):
                if path.name.startswith((".tmp-", ".trash-")) or (NAME_RE.match(path.name) and
                                                                  not (path / COMMITTED).exists()):
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path, ignore_errors=True)
                    else:  # a stray file or link under a checkpoint name would block the next save's mkdir
                        path.unlink(missing_ok=True)
                    removed.append(path.name)
        if dist.is_initialized():
            dist.barrier()
        return removed

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

    def committed(self) -> list[CheckpointInfo]:
        return list_committed(self.root)

    # -- saving -----------------------------------------------------------------------------------------
    def _meta(self, step: int, kind: str) -> dict:
        meta = {"format": META_FORMAT, "step": step, "kind": kind, "saved_at": time.time()}
        parts = {name: part.state_dict() for name, part in self._scoped("global").items()}
        parts.update({name: part.manifest() for name, part in self._scoped("sharded").items()})
        clash = set(parts) & set(meta)
        assert not clash, f"checkpoint part names {clash} clash with meta.json's own fields"
        return {**meta, **parts}

    def _tensors(self) -> tuple[dict, dict[str, list[str]]]:
        """What DCP saves and loads in place: the sharded parts' dicts merged at the root (the layout that
        load_model_state and export read: model.*, optim.*), and which top-level keys are whose."""
        state: dict = {}
        keys: dict[str, list[str]] = {}
        for name, part in self._scoped("sharded").items():
            sd = part.state_dict()
            assert not set(sd) & set(state), "sharded parts must use distinct top-level keys"
            state.update(sd)
            keys[name] = list(sd)
        return state, keys

    def _scope(self) -> dict:
        """Where DCP coordinates: this process alone, or the checkpoint group."""
        return {"no_dist": True} if self.solo else {"process_group": self.group}

    def _agree_failed(self, error: BaseException | None) -> bool:
        return all_reduce_max([float(error is not None)], torch.device("cpu"), self.group)[0] > 0

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
            self._stager = _stager_class()(options)
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
        tmp = self.root / f".tmp-{info.name}"
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
            writer = _Writer(str(tmp), self.rank)
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

    def before_update(self) -> None:
        """Call before anything changes the saved state in place (the optimizer step): waits until the save in
        flight has copied it. The wait counts as that save's blocking time."""
        p = self.pending
        if p is not None and p.staged is not None:
            if not p.staged.done():
                start = time.perf_counter()
                try:
                    p.staged.result()
                except DCP_ERRORS:  # the write fails too; reported by _commit on every rank
                    pass
                p.blocked += time.perf_counter() - start
            p.staged = None

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
        counts as blocking."""
        commit_start = time.perf_counter()
        p, self.pending = self.pending, None
        error = p.future if isinstance(p.future, BaseException) else (
            p.future.exception() if p.future is not None else None)
        if self._agree_failed(error):
            self._raise_failed(p.info, p.tmp, error)
        size, replaced = None, None
        if self.rank == 0:
            try:
                self._write_checksums(p.tmp)
                size = _dir_bytes(p.tmp)
                write_durable(p.tmp / COMMITTED, json.dumps({"committed_at": time.time()}))
                fsync_dir(p.tmp)
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
        self.last_save_seconds = total
        self.last_committed = p.info
        if size is not None:
            self.last_bytes = size
        record = {"checkpoint": p.info.name, "step": p.info.step, "type": p.info.kind, "async": p.asynchronous,
                  "blocking_s": p.blocked, "total_s": total, "bytes": size}
        log.info(f"checkpoint {p.info.name} committed ({'async' if p.asynchronous else 'sync'}: loop blocked "
                 f"{p.blocked:.2f}s, total {total:.2f}s)")
        return record

    def _write_checksums(self, tmp: Path) -> None:
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

    def _trash_name(self, name: str) -> Path:
        return self.root / f".trash-{name}-{uuid.uuid4().hex[:8]}"

    def _apply_retention(self, trash: list[Path] | None = None, keep: Path | None = None) -> None:
        """Keep the newest keep_last_k (by step), every multiple of keep_milestone_every, always the newest, and
        `keep` (the save just committed: after resuming an older checkpoint it can sort below newer ones)."""
        trash = list(trash or [])
        ckpts = self.committed()
        if self.keep_last_k > 0 and len(ckpts) > self.keep_last_k:
            keep = {c.path for c in ckpts[-self.keep_last_k:]} | {ckpts[-1].path} | ({keep} if keep else set())
            if self.keep_milestone_every:
                keep |= {c.path for c in ckpts if c.step % self.keep_milestone_every == 0}
            for c in ckpts:
                if c.path not in keep:
                    trash.append(self._trash_name(c.name))
                    os.replace(c.path, trash[-1])  # atomic: a half-deleted checkpoint is never visible
        if trash:  # deleting gigabytes takes a while: not in the loop. Not a daemon: the process finishes the
            # deletion before it exits; after a kill, start-up removes the leftover .trash-* directories.
            threading.Thread(target=_remove_all, args=(trash,), name="checkpoint-retention").start()

    # -- loading ----------------------------------------------------------------------------------------
    def load(self, info: CheckpointInfo) -> None:
        """Load every part from `info`: the sharded parts' manifests first (a different architecture raises
        ArchitectureMismatch before any tensor is read), then the global and per-rank parts, then the tensors.

        A part that refuses the checkpoint (ConfigError, DataError: another architecture, other data) is a
        user-facing incompatibility, raised at once; anything else is damage (CheckpointError)."""
        read_dcp_metadata(info.path)  # first: a malicious pickle is refused as such (allow-list unpickler)
        self._verify(info, tensors=False)  # meta.json and the per-rank JSON, before any part reads them
        meta = read_meta(info.path)
        try:
            for name, part in self._scoped("sharded").items():
                part.load_manifest(meta.get(name) or {}, info.path)
            for name, part in self._scoped("global").items():
                part.load_state_dict(meta.get(name))  # None: saved before the part existed (the part decides)
        except (ConfigError, DataError) as e:
            where = str(info.path)
            raise type(e)(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{info.path}: unusable {META} ({describe_error(e)})") from None
        state, keys = self._tensors()
        try:
            dcp.load(state, storage_reader=SafeFileSystemReader(str(info.path)), planner=SafeLoadPlanner(),
                     **self._scope())
        except DCP_ERRORS as e:
            raise CheckpointError(f"{info.path}: cannot read the checkpoint ({describe_error(e)})") from None
        # DCP's files are checked after DCP has read them (safely) into `state`, before any part takes them: the
        # bytes are in the page cache by then, and a file refused by the safe readers keeps that reason
        self._verify(info, tensors=True)
        for name, part in self._scoped("sharded").items():
            part.load_state_dict({k: state[k] for k in keys[name]})
        for name, part in self._scoped("rank").items():
            path = info.path / name / f"rank-{self.rank}.json"
            try:
                part.load_state_dict(json.loads(path.read_text()) if path.exists() else None)
            except (OSError, KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{path}: unusable ({describe_error(e)})") from None
        self.last_saved_step = meta["step"]
        self.last_committed = info

    def _verify(self, info: CheckpointInfo, tensors: bool) -> None:
        """Check the checkpoint's files against CHECKSUMS.json: its JSON files (tensors=False) or DCP's files
        (tensors=True). Each rank checks every world-th file, and the ranks agree (the first failure, which names
        the file, is raised on every rank). A checkpoint saved before checksums existed is not checked. Off with
        verify=False."""
        if not self.verify:
            return
        error: str | None = None
        try:
            expected = read_checksums(info.path)
            if expected is not None:
                world = dist.get_world_size(self.group) if not self.solo else 1
                rank = dist.get_rank(self.group) if not self.solo else 0
                names = sorted(n for n in expected if _is_dcp_file(n) == tensors)
                verify_files(info.path, expected, names[rank::world])
        except CheckpointError as e:
            error = str(e)
        if not self.solo:
            gathered: list = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(gathered, error, group=self.group)
            error = next((e for e in gathered if e), None)
        if error:
            raise CheckpointError(error)

    def load_latest(self, candidates: list[CheckpointInfo]) -> tuple[CheckpointInfo, list[tuple[str, str]]]:
        """Load the newest candidate that every rank can load; (the one loaded, [(name, error) of the newer
        ones that failed]). A failed one is skipped, loudly, for the one before, and once an older one has
        loaded the failed ones are renamed to corrupt-NAME (kept for inspection, never loaded, never counted by
        retention) so that the run's new saves do not sit behind them. An incompatibility is not damage: it is
        raised at once. When none loads, the CheckpointError carries the failures as `.failures`."""
        failed: list[tuple[CheckpointInfo, str]] = []
        for info in reversed(candidates):
            error = None
            try:
                self.load(info)
            except (ConfigError, DataError):
                raise
            except DCP_ERRORS as e:  # agree across ranks before deciding
                error = e
            if not self._agree_failed(error):
                self._quarantine([f for f, _ in failed])
                return info, [(f.name, why) for f, why in failed]
            why = describe_error(error) if error is not None and not isinstance(error, CheckpointError) else \
                str(error) if error is not None else "failed to load on another rank"
            log.warning(f"checkpoint {info.name} failed to load ({why}); falling back to the one before")
            failed.append((info, why))
        err = CheckpointError(f"no checkpoint under {self.root} could be loaded "
                              f"(tried {', '.join(c.name for c in reversed(candidates))})")
        err.failures = [(f.name, why) for f, why in failed]
        raise err

    def _quarantine(self, failed: list[CheckpointInfo]) -> None:
        if self.rank == 0:
            for info in failed:
                target = info.path.with_name(f"{CORRUPT_PREFIX}{info.name}")
                if target.exists():
                    target = info.path.with_name(f"{CORRUPT_PREFIX}{info.name}-{int(time.time())}")
                try:
                    os.replace(info.path, target)
                    log.info(f"moved the checkpoint that failed to load to {target}")
                except OSError as e:
                    log.warning(f"could not move {info.path} aside ({e})")
        if dist.is_initialized():
            dist.barrier()

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
