"""Sharded DCP checkpoints: async saves, atomic commits, discovery, fallback, retention.

A checkpoint directory holds the DCP shards of model + optimizer (each rank writes its own), meta.json (step,
counters, data cursor, config, architecture hash; written by rank 0) and rng/rank-R.json. It is written as
checkpoints/.tmp-NAME and becomes checkpoints/NAME (rename) only after every rank's write has finished and
COMMITTED has been written inside it; discovery sees committed directories only, so an interrupted save is
never loaded, and start-up removes its leftovers. Nothing is unpickled: DCP reads tensors, the rest is JSON.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from gpt_simple.parallel import all_reduce_max

COMMITTED = "COMMITTED"
META = "meta.json"
KINDS = {"periodic": "", "shutdown": "-shutdown", "final": "-final"}
NAME_RE = re.compile(r"^step-(\d+)(-shutdown|-final)?$")


class CheckpointError(RuntimeError):
    """A save that failed, or a checkpoint that cannot be used."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    kind: str

    @property
    def name(self) -> str:
        return self.path.name


def checkpoint_name(step: int, kind: str) -> str:
    return f"step-{step}{KINDS[kind]}"


def list_committed(root: Path) -> list[CheckpointInfo]:
    """Committed checkpoints, oldest first (by step; at equal steps periodic < shutdown < final)."""
    found = []
    if root.is_dir():
        for path in root.iterdir():
            m = NAME_RE.match(path.name)
            if m and (path / COMMITTED).exists():
                kind = {"": "periodic", "-shutdown": "shutdown", "-final": "final"}[m.group(2) or ""]
                found.append(CheckpointInfo(path, int(m.group(1)), kind))
    order = {"periodic": 0, "shutdown": 1, "final": 2}
    return sorted(found, key=lambda c: (c.step, order[c.kind]))


def read_meta(path: Path) -> dict:
    try:
        return json.loads((Path(path) / META).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable {META} ({e})") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state(device: torch.device) -> dict:
    state = {"cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if device.type == "cuda":
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    def tensor(b64: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.uint8)
    torch.set_rng_state(tensor(state["cpu"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(tensor(state["cuda"]), device)


class _Pending:
    def __init__(self, info: CheckpointInfo, tmp: Path, future, started: float, blocked: float):
        self.info, self.tmp, self.future, self.started, self.blocked = info, tmp, future, started, blocked


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
        # Background DCP collectives get their own gloo group so they never interleave with training's.
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None

    # -- start-up ---------------------------------------------------------------------------------------
    def clean_partial(self) -> list[str]:
        """Remove directories of saves that never committed (killed mid-write); rank 0, before any save."""
        removed = []
        if self.rank == 0 and self.root.is_dir():
            for path in self.root.iterdir():
                if path.name.startswith((".tmp-", ".trash-")) or (NAME_RE.match(path.name) and
                                                                  not (path / COMMITTED).exists()):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path.name)
        if dist.is_initialized():
            dist.barrier()
        return removed

    def committed(self) -> list[CheckpointInfo]:
        return list_committed(self.root)

    # -- saving -----------------------------------------------------------------------------------------
    def _app_state(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, step: int, meta: dict, kind: str = "periodic", asynchronous: bool = False) -> None:
        """Start a save of the current state at `step`; synchronous saves are committed before returning."""
        self.wait()
        info = CheckpointInfo(self.root / checkpoint_name(step, kind), step, kind)
        tmp = self.root / f".tmp-{info.name}"
        started = time.perf_counter()
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
            (tmp / META).write_text(json.dumps({**meta, "step": step, "kind": kind, "saved_at": time.time()}))
        if dist.is_initialized():
            dist.barrier()
        (tmp / "rng" / f"rank-{self.rank}.json").write_text(json.dumps(rng_state(self.device)))
        state = self._app_state()
        if asynchronous:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.group)
        else:
            future = None
            try:
                dcp.save(state, checkpoint_id=str(tmp), process_group=self.group)
            except Exception as e:  # noqa: BLE001 - every rank must reach the agreement in _commit
                future = e
        self.pending = _Pending(info, tmp, future, started, time.perf_counter() - started)
        self.last_saved_step = step
        if not asynchronous:
            self._commit()

    def pending_vote(self) -> float:
        """1.0 while this rank's async write is still running (all-reduced by the trainer's step agreement)."""
        return float(self.pending is not None and self.pending.future is not None
                     and hasattr(self.pending.future, "done") and not self.pending.future.done())

    def maybe_commit(self, any_rank_pending: bool) -> None:
        if self.pending is not None and not any_rank_pending:
            self._commit()

    def wait(self) -> None:
        """Block until the save in flight (if any) is written, then commit it."""
        if self.pending is not None:
            future = self.pending.future
            if future is not None and hasattr(future, "done"):
                try:
                    future.result()
                except Exception:  # noqa: BLE001 - reported by _commit on every rank
                    pass
            self._commit()

    def _commit(self) -> None:
        p, self.pending = self.pending, None
        error = p.future if isinstance(p.future, BaseException) else (
            p.future.exception() if p.future is not None else None)
        failed = all_reduce_max([float(error is not None)], torch.device("cpu"), self.group)[0] > 0
        if failed:
            reason = f"{type(error).__name__}: {error}" if error else "a write failed on another rank"
            raise CheckpointError(f"saving {p.info.name} failed ({reason}); the previous checkpoint is untouched "
                                  f"and {p.tmp} will be removed at the next start")
        if self.rank == 0:
            marker = p.tmp / COMMITTED
            with open(marker, "w") as f:
                f.write(json.dumps({"committed_at": time.time()}))
                f.flush()
                os.fsync(f.fileno())
            if p.info.path.exists():  # same name saved again (e.g. after a fallback): replace it whole
                shutil.rmtree(p.info.path)
            os.replace(p.tmp, p.info.path)
            _fsync_dir(self.root)
            self._apply_retention()
        total = time.perf_counter() - p.started
        self.last_save_seconds = total
        self.last_committed = p.info
        record = {"checkpoint": p.info.name, "step": p.info.step, "blocking_s": p.blocked, "total_s": total}
        self.history.append(record)
        self.log(f"checkpoint {p.info.name} committed (loop blocked {p.blocked:.2f}s, total {total:.2f}s)")
        if self.on_commit is not None:
            self.on_commit(record)

    def _apply_retention(self) -> None:
        ckpts = self.committed()
        if self.keep_last_k <= 0 or len(ckpts) <= self.keep_last_k:
            return
        keep = {c.path for c in ckpts[-self.keep_last_k:]} | {ckpts[-1].path}
        if self.keep_milestone_every:
            keep |= {c.path for c in ckpts if c.step % self.keep_milestone_every == 0}
        for c in ckpts:
            if c.path not in keep:
                trash = self.root / f".trash-{c.name}"
                os.replace(c.path, trash)  # atomic: a half-deleted checkpoint is never visible
                shutil.rmtree(trash, ignore_errors=True)

    # -- loading ----------------------------------------------------------------------------------------
    def load(self, info: CheckpointInfo) -> dict:
        """Load model, optimizer and this rank's RNG from `info`; returns its meta.json."""
        meta = read_meta(info.path)
        state = self._app_state()
        dcp.load(state, checkpoint_id=str(info.path), process_group=self.group)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng_file = info.path / "rng" / f"rank-{self.rank}.json"
        if rng_file.exists():
            set_rng_state(json.loads(rng_file.read_text()), self.device)
        else:  # more ranks than when saved: a fresh, still deterministic stream for the new rank
            torch.manual_seed(hash((meta.get("step", 0), self.rank)) & 0x7FFFFFFF)
        self.last_saved_step = meta["step"]
        self.last_committed = info
        return meta

    def load_with_fallback(self, candidates: list[CheckpointInfo], on_fallback) -> tuple[CheckpointInfo, dict]:
        """Try the newest first; a checkpoint that fails on any rank is skipped, loudly, for the one before."""
        for info in reversed(candidates):
            error = None
            try:
                meta = self.load(info)
            except Exception as e:  # noqa: BLE001 - agree across ranks before deciding
                error = e
            if all_reduce_max([float(error is not None)], torch.device("cpu"), self.group)[0] == 0:
                return info, meta
            on_fallback(info, error)
        raise CheckpointError(f"no checkpoint under {self.root} could be loaded "
                              f"(tried {', '.join(c.name for c in reversed(candidates))})")

    def close(self) -> None:
        self.wait()
