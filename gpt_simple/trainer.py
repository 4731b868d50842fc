"""The training loop of one launch: build the components once, train until done or told to stop, save, and say
how it ended (launch.py runs it and records failures).

The trainer composes config, model, parallelism, data, checkpoints, shutdown and run state and owns none of
their details. Each step: the ranks agree whether to stop, train on the next batch, record, maybe save. What a
checkpoint holds is the dict `parts` built in __init__, and nothing else.
"""
from __future__ import annotations

import os
import time
from contextlib import ExitStack

import torch
import torch.distributed as dist

from gpt_simple import shutdown
from gpt_simple.checkpoint import CheckpointError, CheckpointManager, resume_candidates
from gpt_simple.config import Config, to_toml
from gpt_simple.data import BucketExhausted, build_stream
from gpt_simple.eval import Evaluator, validation_buckets
from gpt_simple.metrics import MetricsLogger, ThroughputMeter, peak_flops
from gpt_simple.model import GPT, count_params, flops_per_token
from gpt_simple.optim import LRSchedule, build_optimizer
from gpt_simple.parallel import Dist, build_mesh, describe_mesh, parallelize, prepare_micro_batch
from gpt_simple.run_dir import RunDir, append_jsonl, truncate_jsonl, write_atomic, write_json_atomic
from gpt_simple.run_state import COMPLETED, HALTED, RUNNING, STOPPED, RunState
from gpt_simple.runtime import agree, all_reduce_max, log
from gpt_simple.state import ModelOptimizer, RNGState, RunInfo, TrainState


# Test knob: every step takes at least this long (seconds). Deadline-driven chain tests set it so that a job
# cannot train more steps than they plan for, however fast the machine. Unset in production.
STEP_DELAY_ENV = "GPT_SIMPLE_STEP_DELAY_S"


class Halt(Exception):
    """A bucket ran dry and exhaustion is not allowed: save, mark HALTED, exit 0."""


class Trainer:
    def __init__(self, cfg: Config, d: Dist, run_state: RunState, closing: ExitStack):
        t = cfg.training
        self.cfg, self.dist, self.run_state = cfg, d, run_state
        self.run_dir = RunDir(t.output_dir)
        self.deadline = shutdown.resolve_deadline(t.max_runtime_seconds)
        for warning in self.deadline.warnings:
            log.warning(warning)
        run_state.update(max_steps=t.max_steps, deadline_source=self.deadline.source,
                         deadline_at=self.deadline.at, reason="setting up")
        run_state.event("launch", world_size=d.world_size, mesh=list(d.mesh_shape),
                        deadline_source=self.deadline.source, deadline_at=self.deadline.at,
                        warnings=self.deadline.warnings)
        log.info(f"gpt-simple: world size {d.world_size} ({d.backend}, {d.device}), {describe_mesh(d.mesh_shape)}, "
                 f"{shutdown.describe(self.deadline)}")

        torch.manual_seed(t.seed)  # same seed, same full model on every rank, before sharding
        model = GPT(cfg.model)
        n_params = count_params(model, cfg.model)
        flops = flops_per_token(cfg.model, n_params, cfg.data.seq_len)
        self.model = parallelize(model, t, d.device, build_mesh(d.mesh_shape, d.device, t.setup_timeout_seconds))
        self.optimizer = build_optimizer(self.model, cfg.optimizer, d.device)
        self.schedule = LRSchedule(cfg.optimizer, t.max_steps)
        peak, peak_source = peak_flops(d.device, t.peak_flops)
        log.info(f"model: {n_params / 1e6:.2f}M parameters, {flops / 1e6:.2f} MFLOPs/token; "
                 f"peak {peak / 1e12:.2f} TFLOP/s per device ({peak_source})")
        self.tokens_per_step = t.global_batch_size * cfg.data.seq_len
        self.meter = ThroughputMeter(self.tokens_per_step, flops, peak, d.world_size)

        self.stream = build_stream(cfg, d.rank, d.world_size)
        closing.callback(self.stream.close)
        self.evaluator = Evaluator(cfg, self.model, d.device, d.rank, d.world_size,
                                   validation_buckets(cfg, list(self.stream.readers)))
        self.train = TrainState()
        self.parts = {"run": RunInfo(cfg, d.world_size, self.stream.tokenizer), "train": self.train,
                      "data": self.stream, "eval": self.evaluator, "rng": RNGState(d.device, d.rank, self.train),
                      "model": ModelOptimizer(self.model, self.optimizer, cfg.model)}
        self.ckpt = CheckpointManager(self.run_dir.checkpoints, self.parts, d.device, d.rank, t.keep_last_k,
                                      t.keep_milestone_every, verify=t.verify_checkpoints)
        closing.callback(self.ckpt.abandon)  # a launch that fails mid-save leaves no partial checkpoint
        for name in self.ckpt.clean_partial():
            log.info(f"removed uncommitted checkpoint {name}")
            run_state.event("partial_checkpoint_removed", name=name)
        self.resume()

        self.stop = shutdown.StopPolicy(self.run_dir.path, self.deadline, t.walltime_reserve_seconds)
        carried = run_state.state.get("save_s") or {}  # rank 0's; every rank votes with it (one all-reduce)
        carried = all_reduce_max([float(carried.get("sync") or 0), float(carried.get("async") or 0)], d.device)
        overruled = self.stop.carry_over(*carried)
        if overruled:
            log.warning(overruled)
            run_state.event("save_budget", reserve_s=self.stop.reserve, budget_s=self.stop.save_budget(),
                            measured_s=carried[0] or carried[1], carried=True)
        if d.is_main:
            write_atomic(self.run_dir.config, to_toml(cfg))
            if cfg.data.allow_bucket_exhaustion and self.run_dir.halted.exists():
                self.run_dir.halted.unlink()
                run_state.event("halt_overridden", step=self.train.step)
        self.metrics = MetricsLogger(self.run_dir, d.is_main, t.tensorboard, t.max_steps, cfg)
        self.metrics.open(self.train.step)
        closing.callback(self.metrics.close)
        self.audit = self.run_dir.audit if cfg.data.audit and d.is_main else None
        self.step_floor_s = float(os.environ.get(STEP_DELAY_ENV) or 0)
        if self.audit:
            truncate_jsonl(self.audit, self.train.step)

    def resume(self) -> None:
        candidates = resume_candidates(self.cfg.training.resume, self.run_dir.checkpoints)
        if not candidates:
            log.info("starting a fresh run")
            return
        load_start = time.perf_counter()
        try:
            info, failures = self.ckpt.load_latest(candidates)
        except CheckpointError as e:  # none could be loaded: the events still say which failed, and why
            self._record_fallbacks(getattr(e, "failures", []))
            raise
        self._record_fallbacks(failures)
        load_s = time.perf_counter() - load_start
        log.info(f"resumed from {info.name} (step {self.train.step}, {self.train.tokens} tokens; "
                 f"loaded in {load_s:.2f}s)")
        changed = self.parts["run"].changes
        if changed:
            log.info("config changed since the checkpoint: " +
                     ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        self.run_state.event("resume", checkpoint=info.name, step=self.train.step, config_changes=changed,
                             load_s=load_s)
        self.run_state.update(last_checkpoint=info.name)

    def _record_fallbacks(self, failures: list[tuple[str, str]]) -> None:
        for name, error in failures:
            self.run_state.event("checkpoint_fallback", checkpoint=name, error=error)

    # -- the loop -------------------------------------------------------------------------------------------
    def run_loop(self) -> str:
        """Train until max_steps ("max_steps") or until the ranks agree to stop (the reason)."""
        t = self.cfg.training
        self.run_state.update(status=RUNNING, reason="training", step=self.train.step, tokens=self.train.tokens)
        self.meter.reset_window()
        self.maybe_evaluate()  # due at the step resumed from but never recorded: it runs before the next step
        while self.train.step < t.max_steps:
            reason = self.stop_check()
            if reason:
                return reason
            self.meter.step_started()
            try:
                batch = self.stream.next_batch()
            except BucketExhausted as e:
                raise Halt(e) from None
            self.meter.batch_ready()
            loss, grad_norm, lr = self.train_step(batch)
            if self.step_floor_s:
                time.sleep(self.step_floor_s)
            self.record(batch, loss, grad_norm, lr)
            self.meter.step_ended()
            self.maybe_evaluate()
            if self.dist.is_main and self.meter.heartbeat_due():
                self.run_state.heartbeat(self.train.step, self.train.tokens, self.meter.step_seconds,
                                         self.ckpt.last_save_seconds)
            if t.save_steps and self.train.step % t.save_steps == 0 and self.train.step < t.max_steps:
                self.save("periodic", asynchronous=t.async_save)
        return "max_steps"

    def stop_check(self) -> str | None:
        """The per-step agreement (bench/shutdown.py times it): one small all-reduce of every rank's votes;
        commits a finished async save; returns why to stop, or None."""
        next_step = self.meter.step_seconds + self.evaluator.expected_seconds(
            self.train.step + 1, self.meter.step_seconds, self.tokens_per_step)
        votes = self.stop.votes(next_step, save_in_flight=self.ckpt.save_in_flight())
        agreed = agree(votes, self.dist.device)
        self.on_commit(self.ckpt.maybe_commit(agreed.save_in_flight))
        return self.stop.reason(agreed)

    def train_step(self, batch) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Forward/backward over this rank's micro-batches, clip, step. Returns (mean loss, grad norm, lr)."""
        inputs, targets = batch.inputs, batch.targets
        accum = inputs.shape[0]
        loss_sum = torch.zeros((), device=self.dist.device)
        for i in range(accum):
            prepare_micro_batch(self.model, i, accum)
            x = inputs[i].to(self.dist.device, non_blocking=True)
            y = targets[i].to(self.dist.device, non_blocking=True)
            _, loss = self.model(x, y)
            (loss / accum).backward()
            loss_sum += loss.detach()
        clip = self.cfg.optimizer.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        lr = self.schedule.apply(self.optimizer, self.train.step + 1)
        self.ckpt.before_update()  # an async save copies the weights while forward/backward ran: let it finish
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / accum, grad_norm, lr

    def record(self, batch, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> None:
        """The optimizer consumed `batch`: count it, move the data cursor past it, log what is due."""
        t = self.cfg.training
        self.train.step += 1
        self.train.tokens += self.tokens_per_step
        self.stream.commit(batch)
        self.meter.step_trained()
        if self.audit:
            append_jsonl(self.audit, {"step": self.train.step,
                                      "spans": [list(s) for seq in batch.plan.sequences for s in seq]})
        for ev in batch.plan.events:
            log.info(f"bucket {ev['bucket']!r} exhausted at step {ev['step']}: dropped, mix now {ev['mix']}")
            self.run_state.event(**ev)
        if self.train.step % t.log_steps == 0 or self.train.step == t.max_steps:
            self.log_step(loss, grad_norm, lr)

    def log_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> None:
        loss_t = loss.detach().clone()
        if dist.is_initialized() and self.dist.world_size > 1:
            dist.all_reduce(loss_t, op=dist.ReduceOp.SUM)
            loss_t /= self.dist.world_size
        loss_value = float(loss_t)
        if loss_value != loss_value or loss_value in (float("inf"), float("-inf")):
            raise FloatingPointError(f"loss is {loss_value} at step {self.train.step}; stopping without saving "
                                     f"this state")
        grad = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        record = {"step": self.train.step, "loss": loss_value, "lr": lr, "grad_norm": grad,
                  "tokens": self.train.tokens, **self.meter.window()}
        if self.dist.device.type == "cuda":
            record["max_memory_gb"] = torch.cuda.max_memory_allocated(self.dist.device) / 2**30
        self.metrics.log(record)

    def maybe_evaluate(self) -> None:
        """The evaluation that belongs to this step, if one is due: part of the step, budgeted by the stop
        decision, recorded once (the evaluator is a checkpointed part)."""
        if not self.evaluator.due(self.train.step):
            return
        record = self.evaluator.evaluate(self.train.step)
        self.meter.exclude(self.evaluator.last_seconds)
        self.metrics.log_eval(record, self.evaluator.last_seconds)
        self.run_state.update(eval={k: record[k] for k in ("step", "loss", "ppl", "loss_by_bucket")})

    # -- saving -----------------------------------------------------------------------------------------------
    def save(self, kind: str, asynchronous: bool = False) -> None:
        self.on_commit(self.ckpt.wait())  # the save in flight, if any
        if self.ckpt.last_saved_step != self.train.step:  # else this state is saved already
            self.stop.save_started(asynchronous)  # the stop decision budgets what a save in flight still needs
            self.on_commit(self.ckpt.save(self.train.step, kind, asynchronous))

    def on_commit(self, record: dict | None) -> None:
        if record is None:
            return
        self.run_state.event("save", **record)
        self.metrics.scalar("checkpoint/blocking_s", record["blocking_s"], record["step"])
        self.metrics.scalar("checkpoint/total_s", record["total_s"], record["step"])
        overruled = self.stop.record_save(record["total_s"], record["async"])  # the measured save budget
        # save_s: the next launch budgets its first stop decision with this launch's measurement
        self.run_state.update(last_checkpoint=record["checkpoint"], save_s=self.stop.measured())
        if overruled:
            log.warning(overruled)
            self.run_state.event("save_budget", reserve_s=self.stop.reserve, budget_s=self.stop.save_budget(),
                                 measured_s=record["total_s"])
        space = self.ckpt.space_warning()  # the next save will not fit: say so now, with figures
        if space:
            log.warning(space)
            self.run_state.event("disk_space", message=space)

    # -- how the launch ends ------------------------------------------------------------------------------------
    def run(self) -> int:
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

    def finish(self, status: str, reason: str, event: str) -> None:
        if self.dist.is_main and status != HALTED:  # e.g. max_steps lowered to the halted step: no longer HALTED
            self.run_dir.halted.unlink(missing_ok=True)
        step, tokens = self.train.step, self.train.tokens
        self.run_state.update(status=status, reason=reason, step=step, tokens=tokens)
        self.run_state.event(event, reason=reason, step=step, tokens=tokens)
        log.info(f"{status}: {reason}" + ("" if "step" in reason else f" at step {step}"))

    def finish_halt(self, e: BucketExhausted) -> int:
        self.save("shutdown")
        step = self.train.step
        detail = {"bucket": e.bucket, "phase": e.phase, "step": step, "tokens_short": e.tokens_short,
                  "remaining_buckets": e.remaining}
        if e.final:  # exhaustion was allowed, and no bucket of the phase is left: the flag cannot help
            reason = f"{e} (saved at step {step})"
        else:
            reason = (f"bucket {e.bucket!r} ran dry in phase {e.phase} at step {step + 1} ({e.tokens_short} "
                      f"tokens short of a sequence; saved at step {step}); rerun with "
                      f"--data.allow_bucket_exhaustion true to drop it and continue with "
                      f"{', '.join(e.remaining)} renormalised, or end the run there with "
                      f"--training.max_steps {step}")
        if self.dist.is_main:
            write_json_atomic(self.run_dir.halted, {**detail, "reason": reason})
        self.finish(HALTED, reason, "halt")
        return 0
