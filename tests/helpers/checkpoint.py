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


def flip_tensor_byte(ckpt: Path) -> str:
    """Flip one bit in the middle of the largest tensor's bytes in a checkpoint's DCP data (the file format stays
    valid: only the numbers change); the file's name."""
    from gpt_simple.checkpoint import read_dcp_metadata
    where = max(read_dcp_metadata(ckpt).storage_data.values(), key=lambda s: s.length)
    path = Path(ckpt) / where.relative_path
    data = bytearray(path.read_bytes())
    data[where.offset + where.length // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return where.relative_path
