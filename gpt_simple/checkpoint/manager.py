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
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from gpt_simple.checkpoint.files import (COMMITTED, CORRUPT_PREFIX, DCP_ERRORS, META, NAME_RE, ArchitectureMismatch,
                                         CheckpointError, CheckpointInfo, SafeFileSystemReader, SafeLoadPlanner,
                                         fsync_dir, write_durable, check_architecture, checkpoint_name,
                                         describe_error, list_committed, read_dcp_metadata, read_meta, rng_state,
                                         set_rng_state)
from gpt_simple.config import ModelConfig
from gpt_simple.parallel import all_reduce_max, one_thread_here

# Test and drill knob: every checkpoint write sleeps this long first (a slow filesystem), so a test can stop or
# kill a job while a save is in flight. Unset in production.
SAVE_DELAY_ENV = "GPT_SIMPLE_SAVE_DELAY_S"
# Likewise for the async staging copy (a slow device-to-host copy), to test that no update overlaps it.
STAGE_DELAY_ENV = "GPT_SIMPLE_STAGE_DELAY_S"

# One process saves and loads with no_dist (CheckpointManager.solo); DCP then warns on every call, also from its
# background write thread, that it is "assuming the intent is to save in a single process". It is.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class _Writer(FileSystemWriter):
    """FileSystemWriter (fsyncs every file) with the optional test delay before writing."""

    def write_data(self, plan, planner):
        one_thread_here()  # an async save writes from DCP's thread
        delay = float(os.environ.get(SAVE_DELAY_ENV) or 0)
        if delay > 0:
            time.sleep(delay)
        return super().write_data(plan, planner)


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


def tied_aliases(model) -> dict[str, str]:
    """{later name: first name} for parameters registered under more than one name (tied weights)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


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
    """Saves and loads model + optimizer (sharded) and the run's small state; owns the checkpoints folder."""

    def __init__(self, output_dir: Path, model, optimizer, device: torch.device, rank: int,
                 keep_last_k: int = 3, keep_milestone_every: int = 0, log=print, on_commit=None):
        self.root = Path(output_dir) / "checkpoints"
        self.model, self.optimizer, self.device, self.rank = model, optimizer, device, rank
        self.keep_last_k, self.keep_milestone_every = keep_last_k, keep_milestone_every
        self.log, self.on_commit = log, on_commit
        self.pending: _Pending | None = None
        self.last_saved_step: int | None = None
        self.last_committed: CheckpointInfo | None = None
        self.last_save_seconds = 0.0
        self.history: list[dict] = []  # one record per committed save: blocking and total seconds
        self._stager = None
        # Background DCP collectives get their own gloo group so they never interleave with training's.
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        # One process needs no collectives; DCP's plan exchange through gloo would also leave gloo's worker
        # thread with an OpenMP team of its own (see parallel.one_thread_here): slower steps ever after.
        self.solo = not dist.is_initialized() or dist.get_world_size() == 1

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

    def committed(self) -> list[CheckpointInfo]:
        return list_committed(self.root)

    # -- saving -----------------------------------------------------------------------------------------
    def _app_state(self, with_optimizer: bool) -> dict:
        """What DCP saves and loads in place. A tied weight (the output head is the token embedding) appears
        under both names: it is saved once, under the first (for GPT-2 124M that saves 154 MB per checkpoint),
        and load() puts it back under the others.

        Before the first optimizer step there is no optimizer state, and get_state_dict would make one: it
        runs a step with zero gradients and lr 0, which leaves the weights alone but sets AdamW's step count to
        1, so a run resumed from such a save would bias-correct every later step differently from one that
        never stopped. Those saves hold the model only (meta.json: "optimizer_state": false)."""
        if with_optimizer:
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        else:
            model_sd, optim_sd = get_model_state_dict(self.model), None
        aliases = tied_aliases(self.model)
        state = {"model": {k: v for k, v in model_sd.items() if k not in aliases}}
        if optim_sd is not None:
            state["optim"] = optim_sd
        return state

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

    def save(self, step: int, meta: dict, kind: str = "periodic", asynchronous: bool = False) -> None:
        """Start a save of the current state at `step`; synchronous saves are committed before returning.

        Every rank takes part. A failure on any rank (disk full, permission) raises CheckpointError on every
        rank, leaves the previous checkpoints untouched and the partial directory for the next start to remove.
        """
        self.wait()
        info = CheckpointInfo(self.root / checkpoint_name(step, kind), step, kind)
        with_optimizer = bool(self.optimizer.state)  # the same on every rank: all of them step together
        tmp = self.root / f".tmp-{info.name}"
        started = time.perf_counter()
        error: BaseException | None = None
        if self.rank == 0:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / "rng").mkdir(parents=True)
                write_durable(tmp / META, json.dumps({**meta, "step": step, "kind": kind, "saved_at": time.time(),
                                                       "optimizer_state": with_optimizer}))
            except OSError as e:
                error = e
        if self._agree_failed(error):  # also the barrier: the directory exists before any rank writes into it
            self._raise_failed(info, tmp, error)
        future = staged = None
        try:
            write_durable(tmp / "rng" / f"rank-{self.rank}.json", json.dumps(rng_state(self.device)))
            state = self._app_state(with_optimizer)
            writer = _Writer(str(tmp))
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
        if not asynchronous:
            self._commit()

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

    def pending_vote(self) -> float:
        """1.0 while this rank's async write is still running (all-reduced by the trainer's step agreement)."""
        return float(self.pending is not None and self.pending.future is not None
                     and hasattr(self.pending.future, "done") and not self.pending.future.done())

    def maybe_commit(self, any_rank_pending: bool) -> None:
        if self.pending is not None and not any_rank_pending:
            self._commit()

    def wait(self) -> None:
        """Block until the save in flight (if any) is written, then commit it. The time the caller blocks
        here counts as that save's blocking time."""
        if self.pending is not None:
            start = time.perf_counter()
            future = self.pending.future
            if future is not None and hasattr(future, "done"):
                try:
                    future.result()
                except DCP_ERRORS:  # reported by _commit on every rank
                    pass
            self.pending.blocked += time.perf_counter() - start
            self._commit()

    def _raise_failed(self, info: CheckpointInfo, tmp: Path, error: BaseException | None):
        reason = describe_error(error) if error else "a write failed on another rank"
        raise CheckpointError(f"saving {info.name} failed ({reason}); the previous checkpoints are untouched "
                              f"and {tmp} will be removed at the next start")

    def _commit(self) -> None:
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
                size = sum(f.stat().st_size for f in p.tmp.rglob("*") if f.is_file())
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
        record = {"checkpoint": p.info.name, "step": p.info.step, "type": p.info.kind, "async": p.asynchronous,
                  "blocking_s": p.blocked, "total_s": total, "bytes": size}
        self.history.append(record)
        self.log(f"checkpoint {p.info.name} committed ({'async' if p.asynchronous else 'sync'}: loop blocked "
                 f"{p.blocked:.2f}s, total {total:.2f}s)")
        if self.on_commit is not None:
            self.on_commit(record)

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
    def load(self, info: CheckpointInfo) -> dict:
        """Load model, optimizer and this rank's RNG from `info`; returns its meta.json.

        A different architecture raises ArchitectureMismatch before any tensor is read.
        """
        meta = read_meta(info.path)
        model_cfg = getattr(self.model, "cfg", None)
        if isinstance(model_cfg, ModelConfig):
            check_architecture(meta, model_cfg, info.path)
        read_dcp_metadata(info.path)
        with_optimizer = meta.get("optimizer_state", True)
        state = self._app_state(with_optimizer)
        try:
            dcp.load(state, storage_reader=SafeFileSystemReader(str(info.path)), planner=SafeLoadPlanner(),
                     **self._scope())
        except DCP_ERRORS as e:
            raise CheckpointError(f"{info.path}: cannot read the checkpoint ({describe_error(e)})") from None
        for alias, source in tied_aliases(self.model).items():
            state["model"][alias] = state["model"][source]
        if with_optimizer:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
        else:  # saved before the first step: the optimizer starts as fresh as it was then
            set_model_state_dict(self.model, state["model"])
            self.optimizer.state.clear()  # a newer checkpoint that failed to load may have filled it
        rng_file = info.path / "rng" / f"rank-{self.rank}.json"
        if rng_file.exists():
            set_rng_state(json.loads(rng_file.read_text()), self.device)
        else:  # more ranks than when saved: a fresh, still deterministic stream for the new rank
            torch.manual_seed(hash((meta.get("step", 0), self.rank)) & 0x7FFFFFFF)
        self.last_saved_step = meta["step"]
        self.last_committed = info
        return meta

    def load_with_fallback(self, candidates: list[CheckpointInfo], on_fallback) -> tuple[CheckpointInfo, dict]:
        """Try the newest first; a checkpoint that fails on any rank is skipped, loudly, for the one before.

        Once an older one has loaded, the ones that failed are renamed to corrupt-NAME (kept for inspection,
        never loaded, never counted by retention) so that the run's new saves do not sit behind them. An
        architecture mismatch is not a corrupt checkpoint: it is raised at once.
        """
        failed: list[CheckpointInfo] = []
        for info in reversed(candidates):
            error = None
            try:
                meta = self.load(info)
            except ArchitectureMismatch:
                raise
            except DCP_ERRORS as e:  # agree across ranks before deciding
                error = e
            if not self._agree_failed(error):
                self._quarantine(failed)
                return info, meta
            failed.append(info)
            on_fallback(info, error if isinstance(error, CheckpointError) else
                        CheckpointError(describe_error(error)) if error else
                        CheckpointError("failed to load on another rank"))
        raise CheckpointError(f"no checkpoint under {self.root} could be loaded "
                              f"(tried {', '.join(c.name for c in reversed(candidates))})")

    def _quarantine(self, failed: list[CheckpointInfo]) -> None:
        if self.rank == 0:
            for info in failed:
                target = info.path.with_name(f"{CORRUPT_PREFIX}{info.name}")
                if target.exists():
                    target = info.path.with_name(f"{CORRUPT_PREFIX}{info.name}-{int(time.time())}")
                try:
                    os.replace(info.path, target)
                    self.log(f"moved the checkpoint that failed to load to {target}")
                except OSError as e:
                    self.log(f"could not move {info.path} aside ({e})")
        if dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        self.wait()
        if self._stager is not None:
            self._stager.close()
            self._stager = None
