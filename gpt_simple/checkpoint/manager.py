"""The CheckpointManager: sharded DCP saves (async for periodic ones), atomic commits, retention, loading with
fallback. One class for the trainer, composed of one mixin per job:

  saver.py      Saving: save, the async staging (before_update), commit (checksums, COMMITTED, rename),
                one-line failures, the disk-space warning, abandon, close
  loader.py     Loading: load (verified), load_latest (fallback to the checkpoint before), quarantine
  retention.py  Retention: keep_last_k / milestones after each commit, clean_partial at start-up
  base.py       what they share: the folder, the parts by scope, the rank, the DCP group, the agreement

A save is written as checkpoints/.tmp-NAME and becomes checkpoints/NAME (rename) only after every rank's write
has finished and COMMITTED has been written inside it; start-up removes the leftovers of interrupted saves. See
docs/checkpointing.md.
"""
from __future__ import annotations

from pathlib import Path

import torch

from gpt_simple.checkpoint.base import ManagerBase
from gpt_simple.checkpoint.loader import Loading
from gpt_simple.checkpoint.saver import Saving
from gpt_simple.drill import NO_DRILL, Drill


class CheckpointManager(Saving, Loading):
    """Saves and loads a dict of Stateful parts (see gpt_simple/state.py); owns the checkpoints folder.

    save / maybe_commit / wait return the record of the checkpoint they committed (or None): what to do about
    a commit (events, status, metrics) is the caller's business. `drill` slows the writes and the staging copy
    for tests and fire drills (gpt_simple/drill.py)."""

    def __init__(self, root: Path, parts: dict, device: torch.device, rank: int, keep_last_k: int = 3,
                 keep_milestone_every: int = 0, verify: bool = True, drill: Drill = NO_DRILL):
        ManagerBase.__init__(self, root, parts, device, rank)
        self._init_retention(keep_last_k, keep_milestone_every)
        self._init_loading(verify)
        self._init_saving(drill)
