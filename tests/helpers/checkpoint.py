"""Checkpoint helpers: a CheckpointManager over a tiny model (the one sharded part) that has taken one optimizer
step."""
from pathlib import Path

import torch

from gpt_simple.checkpoint import CheckpointManager
from gpt_simple.run_dir import RunDir
from gpt_simple.state import ModelOptimizer
from helpers.paths import ROOT
from helpers.train import TINY


def tiny_trained_manager(out: Path):
    from gpt_simple.config import load_config
    from gpt_simple.model import GPT
    from gpt_simple.optim import build_optimizer
    cfg = load_config(ROOT / "configs" / "tiny.toml", TINY[2:])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    opt = build_optimizer(model, cfg.optimizer, torch.device("cpu"))
    x = torch.randint(0, cfg.model.vocab_size, (2, 16))
    model(x, x)[1].backward()
    opt.step()
    parts = {"model": ModelOptimizer(model, opt, cfg.model)}
    mgr = CheckpointManager(RunDir(out).checkpoints, parts, torch.device("cpu"), rank=0)
    return mgr, model, cfg
