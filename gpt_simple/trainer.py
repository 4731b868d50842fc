"""One launch of a run: build the components once, train until done or told to stop, record how it ended.

The trainer composes config, model, parallelism, data, checkpoints, shutdown and run state and owns none of
their details. Each step: the ranks agree whether to stop, train on the next batch, record, maybe save. What a
checkpoint holds is the dict `parts` built in __init__, and nothing else.
"""
from __future__ import annotations

import errno
import os
import time
import traceback
from contextlib import ExitStack

import torch
import torch.distributed as dist

from gpt_simple import shutdown
from gpt_simple.checkpoint import CheckpointError, CheckpointManager, list_committed, resume_candidates
from gpt_simple.config import Config, ConfigError, to_toml, validate_world
from gpt_simple.data import BucketExhausted, DataError, ShardError, build_stream
from gpt_simple.eval import Evaluator, validation_buckets
from gpt_simple.metrics import MetricsLogger, ThroughputMeter, peak_flops
from gpt_simple.model import GPT, count_params, flops_per_token
from gpt_simple.optim import LRSchedule, build_optimizer
from gpt_simple.lease import EXIT_HELD, Lease, LeaseHeld
from gpt_simple.lease import describe as describe_holder
from gpt_simple.parallel import (Dist, init_distributed, parallelize, prepare_micro_batch, set_collective_timeout,
                                 shutdown_distributed)
from gpt_simple.run_dir import RunDir, append_jsonl, truncate_jsonl, write_atomic, write_json_atomic
from gpt_simple.run_state import COMPLETED, ERROR, HALTED, RUNNING, STOPPED, RunState
from gpt_simple.runtime import agree, log, setup_logging
from gpt_simple.watchdog import GRACE_S as SETUP_WATCHDOG_GRACE_S
from gpt_simple.watchdog import SetupWatchdog
from gpt_simple.state import ModelOptimizer, RNGState, RunInfo, TrainState

USER_ERRORS = (ConfigError, DataError, ShardError, CheckpointError)
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}  # the storage, not a bug: no traceback


class Halt(Exception):
    """A bucket ran dry and exhaustion is not allowed: save, mark HALTED, exit 0."""


TRANSIENT_CAP = 3  # transient failures in a row with no step progress: then ERROR (a broken node must not loop)
EXIT_TRANSIENT = 1  # a transient failure exits non-zero, but its status (STOPPED, "transient: ...") says resume
COLLECTIVE_TIMEOUT_S = 1800.0  # training-loop collectives, once set-up is done (torch's default)
# Failures of the fabric, not of the run: recorded as resumable (see is_transient, docs/orchestration.md).
TRANSIENT_PATTERNS = ("connection reset by peer", "connection refused", "connection closed by peer",
                      "connectfullmesh", "broken pipe", "timed out", "timeout", "socket closed",
                      "nccl communicator was aborted", "nccl error")


class SetupFailed(Exception):
    """Set-up could not complete in time (a rank did not join, the store did not answer): transient."""


def is_transient(error: BaseException) -> bool:
    """A failure of the fabric (peer lost, rendezvous / connect failure, collective timeout): resubmitting can
    help. Bugs and user mistakes are not: only torch.distributed's own errors, connection errors, and a
    RuntimeError from a collective whose message names the network qualify."""
    if isinstance(error, (SetupFailed, ConnectionError, TimeoutError)):
        return True
    dist_errors = tuple(getattr(dist, n) for n in ("DistNetworkError", "DistBackendError", "DistStoreError")
                        if hasattr(dist, n))
    if dist_errors and isinstance(error, dist_errors):
        return True
    if type(error) is RuntimeError or type(error).__name__ in ("DistError",):
        text = str(error).lower()
        return any(p in text for p in TRANSIENT_PATTERNS) or ("gloo" in text and "peer" in text)
    return False


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


def setup_step(what: str, timeout_s: float, fn, *args):
    """Run one set-up step bounded by the process group's timeout; a fabric failure becomes one line saying
    what it waited for."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - only fabric failures are re-raised as SetupFailed
        if is_transient(e):
            raise SetupFailed(f"set-up gave up after at most {timeout_s:g}s (training.setup_timeout_seconds) "
                              f"waiting for {what}: {first_line(e)}") from None
        raise


def run(cfg: Config, force: bool = False) -> int:
    """What `gpt-simple train` runs: one launch, start to end. Returns the exit code."""
    setup_logging(int(os.environ.get("RANK", 0)))
    run_dir, d, run_state, trainer = RunDir(cfg.training.output_dir), None, None, None
    holder = {}  # this launch's lease and state, for the set-up watchdog (another thread)
    watchdog = SetupWatchdog(lambda name: stop_during_setup(name, holder),
                             handled=lambda: shutdown.FLAGS.requested).start()
    t = cfg.training
    with ExitStack() as closing:
        closing.callback(shutdown_distributed)
        try:
            world = os.environ.get("WORLD_SIZE", "1")
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            d = setup_step(f"the process group ({world} ranks, store at {where})", t.setup_timeout_seconds,
                           init_distributed, t.device, t.setup_timeout_seconds)
            validate_world(cfg, d.world_size)
            run_state = open_run(run_dir, d, t.resume, force, t.setup_timeout_seconds)
            holder["run_state"] = run_state
            if run_state.lease is not None:
                closing.callback(run_state.lease.release)
            trainer = setup_step("every rank to build the trainer (set-up collectives)", t.setup_timeout_seconds,
                                 Trainer, cfg, d, run_state, closing)
            set_collective_timeout(COLLECTIVE_TIMEOUT_S)
            watchdog.setup_done()
            return trainer.run()
        except LeaseHeld as e:  # another live job holds the run: one line, nothing written
            if d is None or d.is_main:
                log.error(str(e))
            return EXIT_HELD
        except USER_ERRORS as e:
            error, code, show_traceback = e, 2, False
        except FloatingPointError as e:  # diverged: the message says where; no state is saved
            error, code, show_traceback = e, 1, False
        except Exception as e:  # noqa: BLE001
            if is_transient(e):  # the fabric, not the run: resumable (see record_failure)
                error, code, show_traceback = e, EXIT_TRANSIENT, False
            elif isinstance(e, OSError) and e.errno in DISK_ERRNOS:  # [save safety] storage: one line, no traceback
                error, code, show_traceback = OSError(f"storage failure: {e}"), 1, False
            else:  # recorded as ERROR, then re-reported with its traceback
                error, code, show_traceback = e, 1, True
        finally:
            watchdog.setup_done()
        if trainer is not None:
            step = trainer.train.step
        else:
            step = run_state.previous_step if run_state is not None else 0
        return record_failure(error, code, show_traceback, run_dir, d, run_state, step,
                              transient=is_transient(error))


def stop_during_setup(signal_name: str, holder: dict) -> None:
    """The watchdog's last act when a stop signal found set-up hung: rank 0 records STOPPED (resumable) and
    releases the lease. Runs on the watchdog thread; the process exits right after."""
    log.error(f"stop signal {signal_name} during set-up, which is blocked (waiting on other ranks) "
              f"{SETUP_WATCHDOG_GRACE_S:g}s after it: exiting now (set-up trains nothing, so nothing is lost)")
    run_state = holder.get("run_state")
    if run_state is None or not run_state.enabled:
        return
    try:
        run_state.update(status=STOPPED, reason=f"signal {signal_name} during set-up")
        run_state.event("stop", reason=f"signal {signal_name} during set-up", step=run_state.state.get("step"))
    except Exception as e:  # noqa: BLE001 - the process is exiting either way
        log.error(f"could not record the stop in {run_state.path} ({e})")
    if run_state.lease is not None:
        run_state.lease.release()


def record_failure(error: BaseException, code: int, show_traceback: bool, run_dir: RunDir, d: Dist | None,
                   run_state: RunState | None, step: int, transient: bool = False) -> int:
    """One `error:` line (after the traceback of a bug), and the status where a run folder exists: ERROR, or
    for a transient failure STOPPED with reason "transient: ..." (resumable) until TRANSIENT_CAP of them came in
    a row with no step progress. Never writes without the run's lease."""
    main = d is None or d.is_main
    message = f"{type(error).__name__}: {error}" if show_traceback else str(error)
    if transient:
        message = " ".join(first_line(error).split()) if not isinstance(error, SetupFailed) else str(error)
    if show_traceback and main:
        traceback.print_exception(error)
    log.error(("transient failure (resumable): " if transient else "") + message)
    lease = None
    if run_state is None and main and run_dir.path.is_dir():
        # refused before set-up got this far (e.g. resume = 'scratch', a failed rendezvous): record only if no
        # other live job holds the run
        try:
            lease = Lease(run_dir.path).acquire()
        except (LeaseHeld, OSError):
            return code
        run_state = RunState(run_dir.path)
        step = run_state.previous_step if transient else step
    try:
        if run_state is not None:
            try:  # [save safety] on a full disk even this write can fail: say so once, no second traceback
                if transient:
                    _record_transient(run_state, message, step)
                else:
                    run_state.update(status=ERROR, reason=message, error=message, step=step)
                    run_state.event("error", message=message, step=step)
            except LeaseHeld as e:
                log.error(f"not recording the failure: {e}")
            except OSError as e:
                log.error(f"could not record ERROR in {run_dir.state} ({e.strerror or e}); its status is stale")
    finally:
        if lease is not None:
            lease.release()
    return code


def _record_transient(run_state: RunState, message: str, step: int) -> None:
    s = run_state.state
    last = s.get("transient_step")
    count = 1 if (last is not None and step > last) else int(s.get("transient_failures") or 0) + 1
    if count > TRANSIENT_CAP:
        reason = (f"{count} transient failures in a row with no step progress (cap {TRANSIENT_CAP}); "
                  f"the last: {message}")
        run_state.update(status=ERROR, reason=reason, error=message, step=step, transient_failures=count,
                         transient_step=step)
        run_state.event("error", message=reason, step=step, transient=True)
        log.error(reason)
        return
    reason = f"transient: {message} ({count} of {TRANSIENT_CAP} in a row without progress)"
    run_state.update(status=STOPPED, reason=reason, error=message, step=step, transient_failures=count,
                     transient_step=step)
    run_state.event("transient_failure", message=message, step=step, count=count)


def open_run(run_dir: RunDir, d: Dist, resume: str, force: bool, timeout_s: float = 300.0) -> RunState:
    """Take the run's lease (rank 0), create the run folder (or clear it for resume = 'scratch' --force) and
    start this launch's state. The other ranks learn rank 0's outcome in one broadcast: a refusal stops every
    rank, none waits for a barrier rank 0 never reaches."""
    lease, refusal = None, None
    if d.is_main:
        try:
            try:  # [save safety] a missing / unwritable place for the run is the user's to fix: one line, exit 2
                run_dir.path.mkdir(parents=True, exist_ok=True)
                if not os.access(run_dir.path, os.W_OK | os.X_OK):
                    raise PermissionError(errno.EACCES, "not writable")
            except OSError as e:
                raise ConfigError(f"training.output_dir {str(run_dir.path)!r}: cannot create or write it "
                                  f"({e.strerror or e})") from None
            lease = Lease(run_dir.path).acquire()  # before anything is written; LeaseHeld: nothing is
            if lease.taken_over:
                log.warning(f"took over the lease of a job that is gone: "
                            f"{describe_holder(lease.taken_over)} ({lease.taken_over['why']})")
            if resume == "scratch":
                existing = list_committed(run_dir.checkpoints)
                if existing and not force:
                    raise ConfigError(f"training.resume = 'scratch' but {run_dir.path} has {len(existing)} "
                                      f"checkpoint(s); pass --force to delete the run, or use resume = 'auto'")
                run_dir.clear()
        except (ConfigError, LeaseHeld) as e:
            if lease is not None:
                lease.release()
            refusal = e
    if dist.is_initialized() and d.world_size > 1:
        flag = torch.tensor([0 if refusal is None else 1 if isinstance(refusal, LeaseHeld) else 2],
                            device=d.device)
        setup_step("rank 0 to take the run's lease", timeout_s, dist.broadcast, flag, 0)
        if refusal is None and int(flag) == 1:
            refusal = LeaseHeld({}, run_dir.lease)
        elif refusal is None and int(flag) == 2:
            refusal = ConfigError("rank 0 refused the run folder (its error is above)")
    if refusal is not None:
        raise refusal
    state = RunState(run_dir.path, enabled=d.is_main)
    state.lease = lease
    if lease is not None and lease.taken_over:
        state.event("lease_takeover", previous=lease.taken_over)
    return state


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
        run_state.event("launch", world_size=d.world_size, deadline_source=self.deadline.source,
                        deadline_at=self.deadline.at, warnings=self.deadline.warnings)
        log.info(f"gpt-simple: world size {d.world_size} ({d.backend}, {d.device}), "
                 f"{shutdown.describe(self.deadline)}")

        torch.manual_seed(t.seed)  # same seed, same full model on every rank, before sharding
        model = GPT(cfg.model)
        n_params = count_params(model, cfg.model)
        flops = flops_per_token(cfg.model, n_params, cfg.data.seq_len)
        self.model = parallelize(model, t, d.device)
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
        if d.is_main:
            write_atomic(self.run_dir.config, to_toml(cfg))
            if cfg.data.allow_bucket_exhaustion and self.run_dir.halted.exists():
                self.run_dir.halted.unlink()
                run_state.event("halt_overridden", step=self.train.step)
        self.metrics = MetricsLogger(self.run_dir, d.is_main, t.tensorboard, t.max_steps)
        self.metrics.open(self.train.step)
        closing.callback(self.metrics.close)
        self.audit = self.run_dir.audit if cfg.data.audit and d.is_main else None
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
        next_step = self.meter.step_seconds + self.evaluator.expected_seconds(self.train.step + 1)
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
        self.run_state.update(last_checkpoint=record["checkpoint"])
        overruled = self.stop.record_save(record["total_s"], record["async"])  # the measured save budget
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
