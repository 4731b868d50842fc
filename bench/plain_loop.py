"""The honest floor of overhead: a plain PyTorch training loop over the same model code as train.py.

No FSDP, no process group, no prefetch thread, no checkpoint manager, no run state: gpt_simple.model.GPT built
from the same config and seed, torch.optim.AdamW (foreach, the same decay / no-decay groups and hyper-parameters),
the same warm-up + cosine learning rate, gradient clipping, gradient accumulation over the same micro-batches,
and batches of the same shape read from the same demo shards (contiguous windows, loaded synchronously).

    python bench/plain_loop.py --config configs/bench.toml --steps 10 [--section.field value ...]

prints one JSON line per step ({"step", "seconds", "tokens_per_s", "loss"}) on stdout. bench/throughput.py
runs PlainLoop in its own process, a step at a time, alternating with the trainer's steps. Everything the
trainer adds on top of this loop is overhead that the throughput ratio measures.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpt_simple.config import load_config  # noqa: E402  (parsing only: no trainer code)
from gpt_simple.model import GPT  # noqa: E402


def load_tokens(data_dir: Path) -> np.ndarray:
    """Every bucket's .bin, concatenated (the demo corpus is small; documents are already EOS-separated
    in the stream train.py reads, here they are simply back to back)."""
    parts = []
    for idx in sorted(Path(data_dir).glob("*/*.idx")):
        header = json.loads(idx.read_bytes()[8:512].decode())
        parts.append(np.memmap(idx.with_suffix(".bin"), dtype=header["dtype"], mode="r"))
    if not parts:
        raise SystemExit(f"no shards under {data_dir}: run `python train.py --config configs/tiny.toml` once "
                         f"(it builds the demo corpus), or set data.dir")
    return np.concatenate(parts).astype(np.int64)


def lr_at(step: int, peak: float, floor: float, warmup: int, decay: int) -> float:
    if step <= warmup:
        return peak * step / max(1, warmup) if warmup else peak
    progress = min(1.0, (step - warmup) / decay)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def build(cfg):
    """The model (same seed as train.py) and a plain foreach AdamW with train.py's decay / no-decay groups."""
    o = cfg.optimizer
    torch.manual_seed(cfg.training.seed)
    model = GPT(cfg.model)
    decays = lambda n, p: p.ndim >= 2 and not n.startswith(("tok_emb.", "pos_emb."))  # noqa: E731
    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    no_decay = [p for n, p in model.named_parameters() if not decays(n, p)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=True)
    return model, opt


def train_step(model, opt, x_all, y_all, lr: float, grad_clip: float) -> float:
    """Forward/backward over the micro-batches (accumulated), clip, one AdamW step; returns the mean loss."""
    accum, loss_sum = x_all.shape[0], 0.0
    for i in range(accum):
        _, loss = model(x_all[i], y_all[i])
        (loss / accum).backward()
        loss_sum += loss.item()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum / accum


class PlainLoop:
    """The loop's state: model, optimizer, the token array and its cursor. step() takes one optimizer step on
    the next contiguous window of tokens (wrapping around) and returns its figures."""

    def __init__(self, cfg):
        o, t, d = cfg.optimizer, cfg.training, cfg.data
        self.cfg = cfg
        self.model, self.opt = build(cfg)
        data_dir = Path(d.dir) if Path(d.dir).is_absolute() else ROOT / d.dir
        if d.demo:  # as train.py does: a clean clone has no corpus yet (safe when train.py builds it beside us)
            from gpt_simple.data.prepare import ensure_demo
            ensure_demo(str(data_dir))
        self.tokens = load_tokens(data_dir)
        self.accum, self.micro, self.seq = t.global_batch_size // t.micro_batch_size, t.micro_batch_size, d.seq_len
        self.decay_steps = o.decay_steps or max(1, t.max_steps - o.warmup_steps)
        self.cursor, self.step_count = 0, 0

    def step(self) -> dict:
        o = self.cfg.optimizer
        self.step_count += 1
        start = time.perf_counter()
        per_step = self.accum * self.micro * (self.seq + 1)
        if self.cursor + per_step > len(self.tokens):
            self.cursor = 0
        rows = torch.from_numpy(self.tokens[self.cursor:self.cursor + per_step]).view(self.accum, self.micro,
                                                                                      self.seq + 1)
        self.cursor += per_step
        x_all, y_all = rows[..., :-1].contiguous(), rows[..., 1:].contiguous()
        lr = lr_at(self.step_count, o.lr, o.lr * o.min_lr_ratio, o.warmup_steps, self.decay_steps)
        loss = train_step(self.model, self.opt, x_all, y_all, lr, o.grad_clip)
        seconds = time.perf_counter() - start
        return {"step": self.step_count, "seconds": seconds, "loss": loss, "threads": torch.get_num_threads(),
                "tokens_per_s": self.accum * self.micro * self.seq / seconds}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "bench.toml"))
    parser.add_argument("--steps", type=int, default=10)
    args, overrides = parser.parse_known_args(argv)
    loop = PlainLoop(load_config(args.config, overrides))
    for _ in range(args.steps):
        print(json.dumps(loop.step()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
