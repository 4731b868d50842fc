"""AdamW with decay only on matrices, and the warm-up + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from gpt_simple.config import OptimizerConfig


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, device: torch.device) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Norm gains, biases and embedding tables are vectors or lookups: decaying them only hurts.
        (no_decay if p.ndim < 2 or name.startswith(("tok_emb.", "pos_emb.")) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = cfg.fused == "true" or (cfg.fused == "auto" and device.type == "cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=fused or None, foreach=None if fused else True)


class LRSchedule:
    """Linear warm-up to lr, cosine decay to lr·min_lr_ratio, constant after. A pure function of the step."""

    def __init__(self, cfg: OptimizerConfig, max_steps: int):
        self.peak = cfg.lr
        self.floor = cfg.lr * cfg.min_lr_ratio
        self.warmup = cfg.warmup_steps
        self.decay = cfg.decay_steps or max(1, max_steps - cfg.warmup_steps)

    def __call__(self, step: int) -> float:
        """Learning rate for optimizer step `step` (1-based: the first update is step 1)."""
        if step <= self.warmup:
            return self.peak * step / max(1, self.warmup) if self.warmup else self.peak
        progress = min(1.0, (step - self.warmup) / self.decay)
        return self.floor + 0.5 * (self.peak - self.floor) * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
