"""The parts of a run that a checkpoint holds, each with state_dict() / load_state_dict().

The trainer hands the checkpoint manager a dict {name: part}; that dict is the one definition of what a
checkpoint contains. A part's `checkpoint_scope` says where it is stored:
  "global"   small JSON, identical on every rank: written once into meta.json under its name
  "rank"     small JSON, one per rank (rng/rank-R.json); a rank the checkpoint did not have gets None
  "sharded"  tensors, saved and resharded by torch.distributed.checkpoint; its manifest() (JSON, in meta.json)
             is handed back to load_manifest() before any tensor is read
"""
from __future__ import annotations

import base64
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from gpt_simple.config import Config, ConfigError, ModelConfig, diff


class ArchitectureMismatch(ConfigError):
    """The checkpoint's model architecture differs from the config's: refused, never a reason to fall back."""


@dataclass
class TrainState:
    """Optimizer steps taken and tokens trained on, over the whole run."""
    checkpoint_scope = "global"
    step: int = 0
    tokens: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])


class RunInfo:
    """What the run was started with: the resolved config, the world size and the tokenizer (so that export and
    generate work where data.dir is not at hand). Loading it records how the config changed since."""
    checkpoint_scope = "global"

    def __init__(self, cfg: Config, world_size: int, tokenizer: str):
        self.cfg, self.world_size, self.tokenizer = cfg, world_size, tokenizer
        self.changes: dict[str, tuple] = {}

    def state_dict(self) -> dict:
        return {"config": self.cfg.to_dict(), "world_size": self.world_size, "tokenizer": self.tokenizer}

    def load_state_dict(self, state: dict) -> None:
        self.changes = diff(state["config"], self.cfg.to_dict())


class RNGState:
    """This rank's torch generators (CPU, and the current CUDA device)."""
    checkpoint_scope = "rank"

    def __init__(self, device: torch.device, rank: int, train: TrainState):
        self.device, self.rank, self.train = device, rank, train  # train: its step seeds a rank new to the run

    def state_dict(self) -> dict:
        state = {"cpu": _encode(torch.get_rng_state())}
        if self.device.type == "cuda":
            state["cuda"] = _encode(torch.cuda.get_rng_state(self.device))
        return state

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:  # more ranks than when saved: a fresh, still deterministic stream for the new rank
            torch.manual_seed(hash((self.train.step, self.rank)) & 0x7FFFFFFF)
            return
        torch.set_rng_state(_decode(state["cpu"]))
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(_decode(state["cuda"]), self.device)


def _encode(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


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


def check_architecture(manifest: dict, model_cfg: ModelConfig, where) -> None:
    """Refuse a checkpoint whose architecture hash differs from `model_cfg`, naming the differing fields."""
    now = Config(model=model_cfg)
    if manifest.get("arch_hash") == now.arch_hash():
        return
    fields = diff(manifest.get("architecture") or {}, now.architecture())
    named = ", ".join(f"model.{k} ({a!r} in checkpoint, {b!r} now)" for k, (a, b) in fields.items()) or \
        f"arch hash {manifest.get('arch_hash')!r} in checkpoint, {now.arch_hash()!r} now"
    raise ArchitectureMismatch(f"{where}: architecture differs from the config: {named}")


class ModelOptimizer:
    """Model and optimizer as one sharded part (DCP reshards both to any world size).

    A tied weight (the output head is the token embedding) appears under both names: it is saved once, under
    the first (for GPT-2 124M that saves 154 MB per checkpoint), and put back under the others on load.

    Before the first optimizer step there is no optimizer state, and get_state_dict would make one: it runs a
    step with zero gradients and lr 0, which leaves the weights alone but sets AdamW's step count to 1, so a run
    resumed from such a save would bias-correct every later step differently from one that never stopped.
    Those saves hold the model only (manifest: "optimizer_state": false)."""
    checkpoint_scope = "sharded"

    def __init__(self, model, optimizer, model_cfg: ModelConfig):
        self.model, self.optimizer, self.model_cfg = model, optimizer, model_cfg
        self._load_optimizer: bool | None = None  # what the checkpoint being loaded holds

    @property
    def has_optimizer_state(self) -> bool:
        return bool(self.optimizer.state)  # the same on every rank: all of them step together

    def manifest(self) -> dict:
        cfg = Config(model=self.model_cfg)
        return {"architecture": cfg.architecture(), "arch_hash": cfg.arch_hash(),
                "optimizer_state": self.has_optimizer_state}

    def load_manifest(self, manifest: dict, where) -> None:
        check_architecture(manifest, self.model_cfg, where)
        self._load_optimizer = manifest.get("optimizer_state", True)

    def state_dict(self) -> dict:
        with_optimizer = self.has_optimizer_state if self._load_optimizer is None else self._load_optimizer
        if with_optimizer:
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        else:
            model_sd, optim_sd = get_model_state_dict(self.model), None
        aliases = tied_aliases(self.model)
        state = {"model": {k: v for k, v in model_sd.items() if k not in aliases}}
        if optim_sd is not None:
            state["optim"] = optim_sd
        return state

    def load_state_dict(self, state: dict) -> None:
        self._load_optimizer = None
        for alias, source in tied_aliases(self.model).items():
            state["model"][alias] = state["model"][source]
        if "optim" in state:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
        else:  # saved before the first step: the optimizer starts as fresh as it was then
            set_model_state_dict(self.model, state["model"])
            self.optimizer.state.clear()  # a newer checkpoint that failed to load may have filled it
