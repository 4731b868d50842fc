"""The training loop. It composes config, model, parallelism, data, checkpoints, shutdown and run state,
and owns none of their details: each step it asks whether to stop, trains on the next batch, and records.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from gpt_simple import shutdown
from gpt_simple.checkpoint import (CheckpointError, CheckpointInfo, CheckpointManager, list_committed,
                                   resume_candidates)
from gpt_simple.config import Config, ConfigError, diff, to_toml, validate_world
from gpt_simple.data import BucketExhausted, DataError, ShardError, build_stream, fingerprint
from gpt_simple.metrics import MetricsLogger, peak_flops, truncate_jsonl
from gpt_simple.model import GPT, count_params, flops_per_token
from gpt_simple.optim import LRSchedule, build_optimizer
from gpt_simple.parallel import Dist, all_reduce_max, init_distributed, parallelize, shutdown_distributed
from gpt_simple.run_state import COMPLETED, ERROR, HALTED, HALTED_FILE, STOPPED, RunState, append_jsonl

USER_ERRORS = (ConfigError, DataError, ShardError, CheckpointError)
RUN_FILES = ("checkpoints", "run_state.json", "events.jsonl", "metrics.jsonl", "tensorboard", "data_audit.jsonl",
             HALTED_FILE, shutdown.STOP_FILE, "config.toml")


class Halt(Exception):
    """A bucket ran dry and exhaustion is not allowed: save, mark HALTED, exit 0."""


class Trainer:
    def __init__(self, cfg: Config, force: bool = False):
        self.cfg, self.force = cfg, force
        self.out = Path(cfg.training.output_dir)
        self.dist: Dist | None = None
        self.run_state: RunState | None = None
        self.step = 0
        self.step_seconds = 0.0

    # -- helpers ------------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.dist is None or self.dist.is_main:
            print(message, flush=True)

    def event(self, kind: str, **fields) -> None:
        if self.run_state is not None:
            self.run_state.event(kind, **fields)

    def meta(self) -> dict:
        return {"tokens": self.tokens, "data": self.stream.state_dict(), "data_fingerprint": fingerprint(self.stream),
                "config": self.cfg.to_dict(), "architecture": self.cfg.architecture(),
                "arch_hash": self.cfg.arch_hash(), "world_size": self.dist.world_size,
                # so that export / generate know the tokenizer where data.dir is not at hand
                "tokenizer": next(iter(self.stream.readers.values())).bucket.tokenizer}

    @property
    def tokens(self) -> int:
        return self.stream.state_dict()["sequences"] * self.cfg.data.seq_len

    # -- set-up ---------------------------------------------------------------------------------------------
    def setup(self) -> None:
        t = self.cfg.training
        self.dist = init_distributed(t.device)
        validate_world(self.cfg, self.dist.world_size)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if t.resume == "scratch":
                self._clear_for_scratch()
        if dist.is_initialized():
            dist.barrier()
        self.run_state = RunState(self.out, enabled=self.dist.is_main)
        self.deadline = shutdown.resolve_deadline(t.max_runtime_seconds)
        for warning in self.deadline.warnings:
            shutdown.warn(warning)
        self.run_state.update(max_steps=t.max_steps, deadline_source=self.deadline.source,
                              deadline_at=self.deadline.at, reason="setting up")
        self.event("launch", world_size=self.dist.world_size, deadline_source=self.deadline.source,
                   deadline_at=self.deadline.at, warnings=self.deadline.warnings)
        self.log(f"gpt-simple: world size {self.dist.world_size} ({self.dist.backend}, {self.dist.device}), "
                 f"{shutdown.describe(self.deadline)}")

        torch.manual_seed(t.seed)  # same seed, same full model on every rank, before sharding
        model = GPT(self.cfg.model)
        self.n_params = count_params(model, self.cfg.model)
        self.flops_per_token = flops_per_token(self.cfg.model, self.n_params, self.cfg.data.seq_len)
        self.model = parallelize(model, t, self.dist.device)
        self.optimizer = build_optimizer(self.model, self.cfg.optimizer, self.dist.device)
        self.schedule = LRSchedule(self.cfg.optimizer, t.max_steps)
        self.peak, peak_source = peak_flops(self.dist.device, t.peak_flops)
        self.log(f"model: {self.n_params / 1e6:.2f}M parameters, {self.flops_per_token / 1e6:.2f} MFLOPs/token; "
                 f"peak {self.peak / 1e12:.2f} TFLOP/s per device ({peak_source})")

        self.stream = build_stream(self.cfg, self.dist.rank, self.dist.world_size)
        self.ckpt = CheckpointManager(self.out, self.model, self.optimizer, self.dist.device, self.dist.rank,
                                      t.keep_last_k, t.keep_milestone_every, log=self.log,
                                      on_commit=self.on_commit)
        for name in self.ckpt.clean_partial():
            self.log(f"removed uncommitted checkpoint {name}")
            self.event("partial_checkpoint_removed", name=name)
        self.resume()
        self.stop = shutdown.StopPolicy(self.out, self.deadline, t.walltime_reserve_seconds)
        if self.dist.is_main:
            (self.out / "config.toml").write_text(to_toml(self.cfg))
            if self.cfg.data.allow_bucket_exhaustion and (self.out / HALTED_FILE).exists():
                (self.out / HALTED_FILE).unlink()
                self.event("halt_overridden", step=self.step)
        self.metrics = MetricsLogger(self.out, self.dist.is_main, t.tensorboard, t.max_steps)
        self.metrics.open(self.step)
        self.audit = self.out / "data_audit.jsonl" if self.cfg.data.audit and self.dist.is_main else None
        if self.audit:
            truncate_jsonl(self.audit, self.step)

    def _clear_for_scratch(self) -> None:
        existing = list_committed(self.out / "checkpoints")
        if existing and not self.force:
            raise ConfigError(f"training.resume = 'scratch' but {self.out} has {len(existing)} checkpoint(s); "
                              f"pass --force to delete the run, or use resume = 'auto'")
        for name in RUN_FILES:
            path = self.out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def resume(self) -> None:
        candidates = resume_candidates(self.cfg.training.resume, self.ckpt.root)
        if not candidates:
            self.log("starting a fresh run")
            return

        def on_fallback(info, error):
            shutdown.warn(f"checkpoint {info.name} failed to load ({error}); falling back to the one before")
            self.event("checkpoint_fallback", checkpoint=info.name, error=str(error))

        load_start = time.perf_counter()
        info, meta = self.ckpt.load_with_fallback(candidates, on_fallback)
        load_s = time.perf_counter() - load_start
        self._check_compatible(meta, info)
        self.stream.load_state_dict(meta["data"])
        self.step = meta["step"]
        self.log(f"resumed from {info.name} (step {self.step}, {meta['tokens']} tokens; loaded in {load_s:.2f}s)")
        changed = {k: v for k, v in diff(meta["config"], self.cfg.to_dict()).items()}
        if changed:
            self.log("config changed since the checkpoint: " +
                     ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        self.event("resume", checkpoint=info.name, step=self.step, config_changes=changed, load_s=load_s)
        self.run_state.update(last_checkpoint=info.name)

    def _check_compatible(self, meta: dict, info: CheckpointInfo) -> None:
        """The data must be the same (the architecture was checked by CheckpointManager.load, before any read)."""
        saved, now = meta["data_fingerprint"], fingerprint(self.stream)
        if saved != now or meta["config"]["data"]["seed"] != self.cfg.data.seed:
            raise DataError(f"{info.path}: the data changed since this checkpoint (buckets [docs, tokens] then "
                            f"{saved}, now {now}; data.seed then {meta['config']['data']['seed']}, now "
                            f"{self.cfg.data.seed}); resuming would not continue the same data stream")

    # -- the loop -------------------------------------------------------------------------------------------
    def train_step(self, batch) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Forward/backward over this rank's micro-batches, clip, step. Returns (mean loss, grad norm, lr)."""
        inputs, targets = batch.inputs, batch.targets
        accum = inputs.shape[0]
        loss_sum = torch.zeros((), device=self.dist.device)
        for i in range(accum):
            # Gradients are reduced once, on the last micro-batch.
            self.model.set_requires_gradient_sync(i == accum - 1)
            if self.dist.world_size == 1:  # see parallelize: gather once per step, not once per micro-batch
                self.model.set_reshard_after_backward(i == accum - 1)
            x = inputs[i].to(self.dist.device, non_blocking=True)
            y = targets[i].to(self.dist.device, non_blocking=True)
            _, loss = self.model(x, y)
            (loss / accum).backward()
            loss_sum += loss.detach()
        clip = self.cfg.optimizer.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        lr = self.schedule.apply(self.optimizer, self.step + 1)
        self.ckpt.before_update()  # an async save copies the weights while forward/backward ran: let it finish
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / accum, grad_norm, lr

    @staticmethod
    def to_float(value: torch.Tensor) -> float:
        """A (possibly sharded DTensor) scalar as a Python float."""
        return float(value.full_tensor() if hasattr(value, "full_tensor") else value)

    def run_loop(self) -> str:
        t, max_steps = self.cfg.training, self.cfg.training.max_steps
        first_step, window_start, window_tokens = self.step, time.perf_counter(), 0
        last_heartbeat = 0.0
        data_wait = 0.0
        self.run_state.update(status="RUNNING", reason="training", step=self.step, tokens=self.tokens)
        while self.step < max_steps:
            reason = self.stop_check()
            if reason:
                return reason
            step_start = time.perf_counter()
            try:
                batch = self.stream.next_batch()
            except BucketExhausted as e:
                raise Halt(e) from None
            data_wait += time.perf_counter() - step_start
            loss, grad_norm, lr = self.train_step(batch)
            self.step += 1
            self.stream.commit(batch)
            if self.audit:
                append_jsonl(self.audit, {"step": self.step, "spans": [list(s) for seq in batch.plan.sequences
                                                                       for s in seq]})
            for ev in batch.plan.events:
                self.log(f"bucket {ev['bucket']!r} exhausted at step {ev['step']}: dropped, mix now {ev['mix']}")
                self.event(**ev)
            window_tokens += t.global_batch_size * self.cfg.data.seq_len
            if self.step % t.log_steps == 0 or self.step == max_steps:
                self._log_step(loss, grad_norm, lr, window_tokens, time.perf_counter() - window_start,
                               data_wait, first_step)
                window_start, window_tokens, data_wait = time.perf_counter(), 0, 0.0
            self.step_seconds = time.perf_counter() - step_start
            if self.dist.is_main and time.time() - last_heartbeat > 2.0:
                self.run_state.heartbeat(self.step, self.tokens, self.step_seconds, self.ckpt.last_save_seconds)
                last_heartbeat = time.time()
            if t.save_steps and self.step % t.save_steps == 0 and self.step < max_steps:
                self.save("periodic", asynchronous=t.async_save)
        return "max_steps"

    def stop_check(self) -> str | None:
        """The per-step agreement (bench/shutdown.py times it): one small all-reduce of every rank's stop votes
        and save-in-flight flag; commits a finished async save; returns why to stop, or None."""
        votes = all_reduce_max(self.stop.local_votes(self.step_seconds) + [self.ckpt.pending_vote()],
                               self.dist.device)
        self.ckpt.maybe_commit(votes[3] > 0)
        return self.stop.reason(votes[:3])

    def _log_step(self, loss, grad_norm, lr, window_tokens, window_seconds, data_wait, first_step) -> None:
        loss_t = loss.detach().clone()
        if dist.is_initialized() and self.dist.world_size > 1:
            dist.all_reduce(loss_t, op=dist.ReduceOp.SUM)
            loss_t /= self.dist.world_size
        loss_value = float(loss_t)
        if loss_value != loss_value or loss_value in (float("inf"), float("-inf")):
            raise FloatingPointError(f"loss is {loss_value} at step {self.step}; stopping without saving this state")
        tokens_per_s = window_tokens / max(window_seconds, 1e-9)
        mfu = (self.flops_per_token * tokens_per_s / (self.peak * self.dist.world_size)) if self.peak else None
        record = {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": self.to_float(grad_norm),
                  "tokens": self.tokens, "tokens_per_s": tokens_per_s, "mfu": mfu,
                  "data_wait_frac": data_wait / max(window_seconds, 1e-9)}
        if self.dist.device.type == "cuda":
            record["max_memory_gb"] = torch.cuda.max_memory_allocated(self.dist.device) / 2**30
        self.metrics.log(record, self.step, first_step)

    def save(self, kind: str, asynchronous: bool = False) -> None:
        if self.ckpt.last_saved_step == self.step:
            self.ckpt.wait()  # this state is already saved (or being saved): commit it, do not write it twice
        else:
            self.ckpt.save(self.step, self.meta(), kind, asynchronous)

    def on_commit(self, record: dict) -> None:
        """Called by the checkpoint manager on every rank when a save is committed."""
        self.event("save", **record)
        self.metrics.scalar("checkpoint/blocking_s", record["blocking_s"], record["step"])
        self.metrics.scalar("checkpoint/total_s", record["total_s"], record["step"])
        self.run_state.update(last_checkpoint=record["checkpoint"])
        reserve = self.cfg.training.walltime_reserve_seconds
        if record["total_s"] > reserve and self.deadline.at is not None:
            shutdown.warn(f"the last save took {record['total_s']:.1f}s, more than training.walltime_reserve_seconds "
                          f"= {reserve:g}; set it to at least {record['total_s'] * 1.5:.0f}")

    # -- the whole launch -------------------------------------------------------------------------------------
    def run(self) -> int:
        try:
            self.setup()
            try:
                outcome = self.run_loop()
            except Halt as h:
                return self.finish_halt(h.args[0])
            if outcome == "max_steps":
                self.save("final")
                self.finish(COMPLETED, "max_steps reached", "complete")
            else:
                self.save("shutdown")
                self.stop.clear_stop_file()
                self.finish(STOPPED, outcome, "stop")
            return 0
        except USER_ERRORS as e:
            return self.fail(e, code=2, show_traceback=False)
        except FloatingPointError as e:  # diverged: the message says where; no state is saved
            return self.fail(e, code=1, show_traceback=False)
        except Exception as e:  # noqa: BLE001 - recorded as ERROR, then re-reported with its traceback
            return self.fail(e, code=1, show_traceback=True)
        finally:
            self.close()

    def finish(self, status: str, reason: str, event: str) -> None:
        if self.dist.is_main and status != HALTED:  # e.g. max_steps lowered to the halted step: no longer HALTED
            (self.out / HALTED_FILE).unlink(missing_ok=True)
        self.run_state.update(status=status, reason=reason, step=self.step, tokens=self.tokens)
        self.event(event, reason=reason, step=self.step, tokens=self.tokens)
        self.log(f"{status}: {reason}" + ("" if "step" in reason else f" at step {self.step}"))

    def finish_halt(self, e: BucketExhausted) -> int:
        self.save("shutdown")
        detail = {"bucket": e.bucket, "phase": e.phase, "step": self.step, "tokens_short": e.tokens_short,
                  "remaining_buckets": e.remaining}
        if e.final:  # exhaustion was allowed, and no bucket of the phase is left: the flag cannot help
            reason = f"{e} (saved at step {self.step})"
        else:
            reason = (f"bucket {e.bucket!r} ran dry in phase {e.phase} at step {self.step + 1} ({e.tokens_short} "
                      f"tokens short of a sequence; saved at step {self.step}); rerun with "
                      f"--data.allow_bucket_exhaustion true to drop it and continue with "
                      f"{', '.join(e.remaining)} renormalised, or end the run there with "
                      f"--training.max_steps {self.step}")
        if self.dist.is_main:
            (self.out / HALTED_FILE).write_text(json.dumps({**detail, "reason": reason}, indent=1) + "\n")
        self.finish(HALTED, reason, "halt")
        return 0

    def fail(self, e: BaseException, code: int, show_traceback: bool) -> int:
        message = f"{type(e).__name__}: {e}" if show_traceback else str(e)
        if show_traceback and (self.dist is None or self.dist.is_main):
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr, flush=True)
        if self.run_state is None and self.out.is_dir() and (self.dist is None or self.dist.is_main):
            self.run_state = RunState(self.out)  # refused before set-up got this far (e.g. resume = 'scratch')
        if self.run_state is not None:
            self.run_state.update(status=ERROR, reason=message, error=message, step=self.step)
            self.event("error", message=message, step=self.step)
        return code

    def close(self) -> None:
        for name in ("stream", "metrics"):
            part = getattr(self, name, None)
            if part is not None:
                part.close()
        shutdown_distributed()
