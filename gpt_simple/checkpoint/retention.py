"""Retention: which committed checkpoints stay (keep_last_k, milestones, the newest, the save just committed), how
the others go (renamed aside to .trash-*, then deleted off the loop), and the start-up removal of what interrupted
saves and deletions left behind."""
from __future__ import annotations

import os
import shutil
import threading
import uuid
from pathlib import Path

import torch.distributed as dist

from gpt_simple.checkpoint.base import ManagerBase
from gpt_simple.checkpoint.files import COMMITTED, NAME_RE, TMP_PREFIX, TRASH_PREFIX
from gpt_simple.run_dir import quarantined


def _remove_all(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


class Retention(ManagerBase):
    """The manager's retention (a mixin of CheckpointManager); rank 0 alone calls _apply_retention."""

    def _init_retention(self, keep_last_k: int, keep_milestone_every: int) -> None:
        self.keep_last_k, self.keep_milestone_every = keep_last_k, keep_milestone_every
        self.quarantine_removed: list[str] = []  # corrupt-* removed by the last retention (the trainer records it)

    def quarantined(self) -> list[tuple[str, int]]:
        """The checkpoints moved aside as damaged (corrupt-step-N[...]): (folder name, step)."""
        return quarantined(self.root)

    def clean_partial(self) -> list[str]:
        """Remove directories of saves that never committed (killed mid-write); rank 0, before any save."""
        removed = []
        if self.rank == 0 and self.root.is_dir():
            for path in sorted(self.root.iterdir()):
                if path.name.startswith((TMP_PREFIX, TRASH_PREFIX)) or (NAME_RE.match(path.name) and
                                                                        not (path / COMMITTED).exists()):
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path, ignore_errors=True)
                    else:  # a stray file or link under a checkpoint name would block the next save's mkdir
                        path.unlink(missing_ok=True)
                    removed.append(path.name)
        if dist.is_initialized():
            dist.barrier()
        return removed

    def _outdated_quarantine(self, ckpts) -> list[Path]:
        """Damaged checkpoints whose steps a newer committed save has reached: the work they held is saved again,
        so keeping them only costs disk."""
        newest = max((c.step for c in ckpts), default=-1)
        self.quarantine_removed = [name for name, step in self.quarantined() if step <= newest]
        return [self.root / name for name in self.quarantine_removed]

    def _trash_name(self, name: str) -> Path:
        return self.root / f"{TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}"

    def _apply_retention(self, trash: list[Path] | None = None, keep: Path | None = None) -> None:
        """Keep the newest keep_last_k (by step), every multiple of keep_milestone_every, always the newest, and
        `keep` (the save just committed: after resuming an older checkpoint it can sort below newer ones)."""
        trash = list(trash or [])
        ckpts = self.committed()
        drop = []
        if self.keep_last_k > 0 and len(ckpts) > self.keep_last_k:
            keep = {c.path for c in ckpts[-self.keep_last_k:]} | {ckpts[-1].path} | ({keep} if keep else set())
            if self.keep_milestone_every:
                keep |= {c.path for c in ckpts if c.step % self.keep_milestone_every == 0}
            drop = [c.path for c in ckpts if c.path not in keep]
        if self.keep_last_k > 0:
            drop += self._outdated_quarantine(ckpts)
        for path in drop:
            trash.append(self._trash_name(path.name))
            os.replace(path, trash[-1])  # atomic: a half-deleted checkpoint is never visible
        if trash:  # deleting gigabytes takes a while: not in the loop. Not a daemon: the process finishes the
            # deletion before it exits; after a kill, start-up removes the leftover .trash-* directories.
            threading.Thread(target=_remove_all, args=(trash,), name="checkpoint-retention").start()
