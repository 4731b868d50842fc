"""Held-out evaluation: the loss on each bucket's validation split, the same sequences every time.

The validation sequences of a bucket are its split's documents in file order, each followed by an
end-of-document token, cut into windows of seq_len + 1 tokens (inputs and shifted targets, as in training);
an evaluation reads the first `eval.tokens // seq_len` of them (all there are, if fewer). Rank r of W takes the
contiguous slice r of them, padded so that every rank runs the same number of forward passes (FSDP gathers
weights collectively); the per-bucket sums of token losses are reduced over ranks. Nothing here depends on the
world size except the order in which floats are summed.

The evaluator is a checkpointed part: it remembers the last step it evaluated, so an evaluation that was due
at a resumed step and never recorded runs first after the resume, and one that was recorded never runs twice.
How long an evaluation takes is the clock's (gpt_simple/clock.py), which budgets the stop decision with it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from gpt_simple.config import Config
from gpt_simple.data.shards import VAL_SPLIT, Bucket, ShardError
from gpt_simple.parallel import reshard_all


def validation_buckets(cfg: Config, names: list[str]) -> dict[str, Bucket]:
    """The validation split of each training bucket that has one: eval.dir/BUCKET if eval.dir is set (a split
    prepared separately), else data.dir/BUCKET/val."""
    found = {}
    for name in names:
        folder = Path(cfg.eval.dir) / name if cfg.eval.dir else Path(cfg.data.dir) / name / VAL_SPLIT
        if folder.is_dir() and any(folder.glob("*.idx")):
            bucket = Bucket(folder)
            bucket.name = name
            found[name] = bucket
    return found


def no_split_message(cfg: Config) -> str:
    where = f"eval.dir {cfg.eval.dir!r}" if cfg.eval.dir else f"data.dir/BUCKET/{VAL_SPLIT}"
    return (f"eval: no bucket has a validation split ({where}); prepare one with `gpt-simple prepare ... "
            f"--val-docs N`, or set eval.every_steps = 0 and eval.at_end = false")


def describe(record: dict) -> str:
    """An evaluation record as the console shows it: 'val loss L | ppl P | code Lc prose Lp'."""
    buckets = " ".join(f"{b} {v:.4f}" for b, v in record["loss_by_bucket"].items())
    return f"val loss {record['loss']:.4f} | ppl {record['ppl']:.2f} | {buckets}"


def validation_sequences(bucket: Bucket, seq_len: int, tokens: int) -> np.ndarray:
    """(n, seq_len + 1) int64: the bucket's first windows, n = min(ceil(tokens / seq_len), what it holds)."""
    want = -(-tokens // seq_len) * (seq_len + 1)
    parts, have = [], 0
    for doc in range(bucket.n_docs):
        if have >= want:
            break
        parts.append(np.asarray(bucket.document(doc), dtype=np.int64))
        parts.append(np.array([bucket.eos], dtype=np.int64))
        have += len(parts[-2]) + 1
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    n = min(len(flat), want) // (seq_len + 1)
    return flat[: n * (seq_len + 1)].reshape(n, seq_len + 1)


class Evaluator:
    """Evaluates the model on the validation sequences when due; remembers the last step it evaluated."""
    checkpoint_scope = "global"

    def __init__(self, cfg: Config, model, device: torch.device, rank: int, world_size: int,
                 buckets: dict[str, Bucket]):
        e = cfg.eval
        self.every, self.at_end, self.max_steps = e.every_steps, e.at_end, cfg.training.max_steps
        self.model, self.device, self.rank, self.world_size = model, device, rank, world_size
        self.micro_batch = cfg.training.micro_batch_size
        self.sequences = {name: validation_sequences(b, cfg.data.seq_len, e.tokens) for name, b in buckets.items()}
        self.sequences = {name: seqs for name, seqs in self.sequences.items() if len(seqs)}
        if self.enabled and not self.sequences:
            raise ShardError(no_split_message(cfg))
        self.last_step = -1    # the last step whose evaluation is recorded

    @property
    def enabled(self) -> bool:
        return self.every > 0 or self.at_end

    def tokens(self) -> dict[str, int]:
        """Target tokens each evaluation reads per bucket."""
        return {name: int(seqs.shape[0] * (seqs.shape[1] - 1)) for name, seqs in self.sequences.items()}

    def due(self, step: int) -> bool:
        """An evaluation belongs to this step and has not been recorded."""
        scheduled = (self.every > 0 and step > 0 and step % self.every == 0) or \
            (self.at_end and step == self.max_steps)
        return scheduled and step > self.last_step and bool(self.sequences)

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict | None) -> None:
        # None: a checkpoint from before evaluation existed; an evaluation due at its step runs after the resume.
        # (Checkpoints before the clock also hold the evaluation's "seconds": run_state.json carries it now.)
        self.last_step = -1 if state is None else int(state["last_step"])

    def evaluate(self, step: int) -> dict:
        """Every bucket's mean token loss, their token-weighted mean and its perplexity; leaves the model, its
        sharding and the RNG exactly as they were, so training goes on as if nothing ran."""
        was_training = self.model.training
        rng = torch.get_rng_state()
        self.model.eval()
        try:
            with torch.no_grad():
                sums = torch.tensor([self._loss_sum(seqs) for seqs in self.sequences.values()], dtype=torch.float64)
            if dist.is_initialized() and self.world_size > 1:
                sums = sums.to(self.device)
                dist.all_reduce(sums, op=dist.ReduceOp.SUM)
                sums = sums.cpu()
        finally:
            self.model.train(was_training)
            reshard_all(self.model)
            torch.set_rng_state(rng)
        tokens = self.tokens()
        by_bucket = {name: float(s) / tokens[name] for name, s in zip(self.sequences, sums.tolist())}
        loss = float(sums.sum()) / sum(tokens.values())
        self.last_step = step
        return {"type": "eval", "step": step, "loss": loss, "ppl": math.exp(min(loss, 700.0)),
                "tokens": sum(tokens.values()), "loss_by_bucket": by_bucket}

    def _loss_sum(self, seqs: np.ndarray) -> float:
        """This rank's sum of token losses over its slice of `seqs` (padded: every rank runs as many forwards)."""
        per_rank = -(-len(seqs) // self.world_size)
        mine = seqs[self.rank * per_rank:(self.rank + 1) * per_rank]
        total = 0.0
        for first in range(0, per_rank, self.micro_batch):
            rows = mine[first:first + self.micro_batch]
            real = len(rows)
            width = min(self.micro_batch, per_rank - first)
            batch = np.zeros((width, seqs.shape[1]), dtype=np.int64)
            batch[:real] = rows
            data = torch.from_numpy(batch).to(self.device)
            logits = self.model(data[:, :-1])
            losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), data[:, 1:].reshape(-1),
                                     reduction="none").view(width, -1)
            total += float(losses[:real].double().sum()) if real else 0.0
        return total
