"""What the checkpoint manager's jobs share (saver.py, loader.py, retention.py): the checkpoints folder, the dict
of parts by scope, this rank, where DCP coordinates, and the agreement of every rank on a failure."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from gpt_simple.checkpoint.files import CheckpointInfo, list_committed
from gpt_simple.runtime import all_reduce_max

# One process saves and loads with no_dist (ManagerBase.solo); DCP then warns on every call, also from its
# background write thread, that it is "assuming the intent is to save in a single process". It is.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class ManagerBase:
    """The state every job of the CheckpointManager reads. The newest checkpoint this launch saved or loaded is
    recorded here by both the saver and the loader."""

    def __init__(self, root: Path, parts: dict, device: torch.device, rank: int):
        self.root, self.parts, self.device, self.rank = Path(root), parts, device, rank
        self.last_saved_step: int | None = None
        self.last_committed: CheckpointInfo | None = None
        # (name, chain.Link) of the newest checkpoint saved or loaded that carries a link: the next commit chains
        # to it. None: the next commit starts the chain (a fresh run, or a resume from one that predates it).
        self.chain: tuple | None = None
        # Background DCP collectives get their own gloo group so they never interleave with training's.
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        # One process needs no collectives; DCP's plan exchange through gloo would also leave gloo's worker
        # thread with an OpenMP team of its own (see runtime.one_thread_here): slower steps ever after.
        self.solo = not dist.is_initialized() or dist.get_world_size() == 1

    def _scoped(self, scope: str) -> dict:
        return {name: part for name, part in self.parts.items() if part.checkpoint_scope == scope}

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

    def _agree_class(self, kind: int) -> int:
        """The ranks' highest failure class (failures.py): every rank acts on the same one."""
        return int(all_reduce_max([float(kind)], torch.device("cpu"), self.group)[0])

    def committed(self) -> list[CheckpointInfo]:
        return list_committed(self.root)
