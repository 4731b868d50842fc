"""The training loop of one launch: build the components once, train until done or told to stop, save, and say
how it ended (launch.py runs it and records failures).

The trainer composes config, model, parallelism, data, checkpoints, the clock and the journal and owns none of
their details: it knows no file name (the journal writes every record), keeps no duration (the clock does) and
does not decide what a checkpoint holds beyond handing the manager the dict `parts`.

Each step: the ranks agree (one all-reduce) on whether to stop and whether every rank's async save has
finished; a finished save is committed; then, unless they stop, the step trains on the next batch, records,
maybe evaluates, maybe saves.
"""
from __future__ import annotations

import enum
from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt_simple import shutdown
from gpt_simple.checkpoint import CheckpointError, CheckpointManager, resume_candidates
from gpt_simple.clock import CARRIED, Clock, ThroughputMeter
from gpt_simple.config import Config, ConfigError, to_toml
from gpt_simple.data import BucketExhausted, build_stream
from gpt_simple.drill import ENV
from gpt_simple.eval import Evaluator, validation_buckets
from gpt_simple.flops import peak_flops
from gpt_simple.hf import HFError
from gpt_simple.hf_io import load_into
from gpt_simple.journal import Journal, events
from gpt_simple.model import GPT, count_params, flops_per_token
from gpt_simple.optim import LRSchedule, build_optimizer
from gpt_simple.parallel import Dist, build_mesh, describe_mesh, parallelize, prepare_micro_batch
from gpt_simple.run_state import COMPLETED, ERROR, HALTED, RUNNING, STOPPED
from gpt_simple.runtime import agree, all_reduce_max, log
from gpt_simple.state import ModelOptimizer, RNGState, RunInfo, TrainState


class End(enum.Enum):
    """Why the loop ended: the status the launch ends with."""
    COMPLETED = COMPLETED  # max_steps reached
    STOPPED = STOPPED      # the ranks agreed to stop (signal, deadline, stop file)
    HALTED = HALTED        # a bucket ran dry and exhaustion is not allowed


IDLE_CAP = 2  # launches in a row that train nothing before their deadline: the next one is an ERROR


@dataclass
class LoopEnd:
    end: End
    reason: str
    exhausted: BucketExhausted | None = None


class Trainer:
    def __init__(self, cfg: Config, d: Dist, journal: Journal, closing: ExitStack, clock: Clock):
        t = cfg.training
        self.cfg, self.dist, self.journal, self.clock = cfg, d, journal, clock
        self.announce()
        self.tokens_per_step = t.global_batch_size * cfg.data.seq_len
        self.candidates = resume_candidates(t.resume, journal.run_dir.checkpoints)
        self.model, self.optimizer, self.meter = self.build_model()
        clock.mark("model")  # built, sharded (set-up collectives), its optimizer
        self.schedule = LRSchedule(cfg.optimizer, t.max_steps)
        self.stream = build_stream(cfg, d.rank, d.world_size)
        closing.callback(self.stream.close)
        self.evaluator = Evaluator(cfg, self.model, d.device, d.rank, d.world_size,
                                   validation_buckets(cfg, list(self.stream.readers)))
        clock.mark("data")  # the stream (the data index), the held-out split
        self.train = TrainState()
        self.parts = {"run": RunInfo(cfg, d.world_size, self.stream.tokenizer), "train": self.train,
                      "data": self.stream, "eval": self.evaluator, "rng": RNGState(d.device, d.rank, self.train),
                      "model": ModelOptimizer(self.model, self.optimizer, cfg.model)}
        self.ckpt = CheckpointManager(journal.run_dir.checkpoints, self.parts, d.device, d.rank, t.keep_last_k,
                                      t.keep_milestone_every, verify=t.verify_checkpoints, drill=clock.drill)
        closing.callback(self.ckpt.abandon)  # a launch that fails mid-save leaves no partial checkpoint
        for name in self.ckpt.clean_partial():
            log.info(f"removed uncommitted checkpoint {name}")
            journal.event(events.PartialCheckpointRemoved(name=name))
        self.resume()
        self.carry_over_durations()
        clock.mark("checkpoint")  # partial saves cleaned, the resume (load and verification), carried figures
        self.stop = shutdown.StopPolicy(t.output_dir, clock.deadline)
        journal.begin(cfg, to_toml(cfg), self.train.step)
        closing.callback(journal.close)

    def announce(self) -> None:
        deadline, d = self.clock.deadline, self.dist
        for warning in deadline.warnings:
            log.warning(warning)
        self.journal.status(max_steps=self.cfg.training.max_steps, deadline_source=deadline.source,
                            deadline_at=deadline.at, reason="setting up")
        self.journal.event(events.Launch(world_size=d.world_size, mesh=list(d.mesh_shape),
                                         deadline_source=deadline.source, deadline_at=deadline.at,
                                         warnings=deadline.warnings, started_at=self.clock.process_start,
                                         previous_seen_at=self.journal.previous_seen_at))
        if self.clock.drill.active:  # a test drill: never silent
            log.warning(f"drill active ({ENV}): {self.clock.drill.describe()}")
            self.journal.event(events.Drill(seconds=dict(self.clock.drill.seconds)))
        log.info(f"gpt-simple: world size {d.world_size} ({d.backend}, {d.device}), {describe_mesh(d.mesh_shape)}, "
                 f"{shutdown.describe(deadline)}")

    def build_model(self):
        """The model (seeded, the same on every rank before sharding), sharded; its optimizer; the meter."""
        cfg, d, t = self.cfg, self.dist, self.cfg.training
        torch.manual_seed(t.seed)
        model = GPT(cfg.model)
        self.start_from(model)
        n_params = count_params(model, cfg.model)
        flops = flops_per_token(cfg.model, n_params, cfg.data.seq_len)
        model = parallelize(model, t, d.device, build_mesh(d.mesh_shape, d.device, t.setup_timeout_seconds))
        optimizer = build_optimizer(model, cfg.optimizer, d.device)
        peak, peak_source = peak_flops(d.device, t.peak_flops)
        log.info(f"model: {n_params / 1e6:.2f}M parameters, {flops / 1e6:.2f} MFLOPs/token; "
                 f"peak {peak / 1e12:.2f} TFLOP/s per device ({peak_source})")
        meter = ThroughputMeter(self.tokens_per_step, flops, peak, d.world_size)
        return model, optimizer, meter

    def start_from(self, model: GPT) -> None:
        """model.init_from: a fresh run's plain model takes the folder's weights, on every rank alike, before it
        is sharded; a run with a checkpoint resumes from that instead."""
        path = self.cfg.model.init_from
        if not path:
            return
        if self.candidates:
            log.info(f"model.init_from {path!r} ignored: the run resumes from its own checkpoint "
                     f"{self.candidates[-1].name} (init_from only starts a fresh run)")
            return
        try:
            loaded = load_into(model, path, self.cfg.model, digest=self.dist.is_main)
        except HFError as e:
            raise ConfigError(str(e)) from None
        log.info(f"initialised the model from {loaded.path} ({loaded.layout}, {loaded.tensors} tensors, "
                 f"sha256 {loaded.sha256 or '-'})")
        self.journal.event(events.InitFrom(path=loaded.path, layout=loaded.layout, sha256=loaded.sha256,
                                           files=loaded.files, tensors=loaded.tensors))

    def resume(self) -> None:
        candidates = self.candidates
        if not candidates:
            log.info("starting a fresh run")
            return
        try:
            with self.clock.measure("load"):
                info, failures = self.ckpt.load_latest(candidates)
        except CheckpointError as e:  # none could be loaded: the events still say which failed, and why
            self.record_fallbacks(getattr(e, "failures", []))
            raise
        self.record_fallbacks(failures)
        if self.ckpt.unchecked:
            self.journal.event(events.CheckpointUnchecked(checkpoint=info.name, reason=self.ckpt.unchecked))
        load_s = self.clock.last["load"]
        log.info(f"resumed from {info.name} (step {self.train.step}, {self.train.tokens} tokens; "
                 f"loaded in {load_s:.2f}s)")
        changed = self.parts["run"].changes
        if changed:
            log.info("config changed since the checkpoint: " +
                     ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        self.journal.event(events.Resume(checkpoint=info.name, step=self.train.step, config_changes=changed,
                                         load_s=load_s))
        self.record_amendment(self.stream.amendment)
        self.journal.status(last_checkpoint=info.name)

    def record_amendment(self, amendment: dict | None) -> None:
        """data.amend accepted a changed data plan at the checkpoint's step: one log line and one event."""
        if amendment:
            log.info(f"data plan amended (plan {amendment['number']}, from step {amendment['step'] + 1} on): "
                     + "; ".join(amendment["changes"]))
            self.journal.event(events.PlanAmended(**amendment))

    def record_fallbacks(self, failures: list[tuple[str, str]]) -> None:
        for name, error in failures:
            self.journal.event(events.CheckpointFallback(checkpoint=name, error=error))

    def carry_over_durations(self) -> None:
        """The previous launch's measured durations (the journal reads them on rank 0), agreed in one all-reduce
        so that every rank budgets its stop votes alike; then the journal carries this launch's figures."""
        previous = self.journal.durations
        kinds = [f"{kind}_s" for kind in CARRIED]
        agreed = all_reduce_max([float(previous.get(k) or 0) for k in kinds], self.dist.device)
        overruled = self.clock.carry_over(dict(zip(kinds, agreed)))
        self.announce_save_budget(overruled, self.clock.measured_save(), carried=True)
        self.journal.follow(self.clock)

    def announce_save_budget(self, overruled: str | None, measured_s: float, carried: bool | None = None) -> None:
        """The clock's warning that a measured save overrules the reserve: one log line and one event."""
        if overruled:
            log.warning(overruled)
            self.journal.event(events.SaveBudget(reserve_s=self.clock.reserve, budget_s=self.clock.save_budget(),
                                                 measured_s=measured_s, carried=carried))

    # -- the loop -------------------------------------------------------------------------------------------
    def run_loop(self) -> LoopEnd:
        """Train until max_steps, until the ranks agree to stop, or until a bucket runs dry."""
        self.journal.status(status=RUNNING, reason="training", step=self.train.step, tokens=self.train.tokens)
        setup_s = self.clock.setup_done()
        self.journal.event(events.Setup(phases=dict(self.clock.phases), setup_s=setup_s))
        self.meter.reset_window()
        self.maybe_evaluate()  # due at the step resumed from but never recorded: it runs before the next step
        while self.train.step < self.cfg.training.max_steps:
            votes = self.agree()
            self.commit_finished_save(votes)
            reason = self.stop_check(votes)
            if reason:
                return LoopEnd(End.STOPPED, reason)
            if 0 < self.cfg.training.stop_at_step <= self.train.step:  # the same on every rank: no agreement
                return LoopEnd(End.STOPPED, f"training.stop_at_step {self.train.step} reached")
            self.clock.step_started()
            try:
                batch = self.stream.next_batch()
            except BucketExhausted as e:
                return LoopEnd(End.HALTED, str(e), exhausted=e)
            self.meter.batch_ready(self.clock.step_start)
            self.record(batch, *self.train_step(batch))
            self.clock.step_ended()
            self.maybe_evaluate()
            if self.meter.heartbeat_due():
                self.journal.heartbeat(self.train.step, self.train.tokens)
            self.maybe_save()
        return LoopEnd(End.COMPLETED, "max_steps reached")

    def agree(self) -> shutdown.StopVotes:
        """The step boundary's one collective (bench/shutdown.py times it): every rank's stop votes and whether
        its async save is still writing, agreed (any rank's yes is everyone's)."""
        eval_due = self.evaluator.due(self.train.step + 1)
        next_step = self.clock.step_seconds + (self.clock.expected_eval_seconds(
            sum(self.evaluator.tokens().values()), self.tokens_per_step) if eval_due else 0.0)
        in_flight = self.ckpt.save_in_flight()
        near = self.clock.near_deadline(next_step, save_in_flight=in_flight)
        return agree(self.stop.votes(near, save_in_flight=in_flight), self.dist.device)

    def stop_check(self, votes: shutdown.StopVotes) -> str | None:
        """Why the agreed votes say to stop, or None. No side effect."""
        return self.stop.reason(votes)

    def commit_finished_save(self, votes: shutdown.StopVotes) -> None:
        """An async save that every rank has finished writing is committed, at the same step on every rank."""
        self.on_commit(self.ckpt.maybe_commit(votes.save_in_flight))

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
        # an async save copies the weights while forward/backward ran: let it finish
        self.clock.waited_for_save(self.ckpt.before_update())
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
        self.journal.audit(self.train.step, [list(s) for seq in batch.plan.sequences for s in seq],
                           batch.plan.state_after["plan"]["number"])
        for dropped in batch.plan.dropped:
            log.info(f"bucket {dropped['bucket']!r} exhausted at step {dropped['step']}: dropped, mix now "
                     f"{dropped['mix']}")
            self.journal.event(events.BucketDropped(**dropped))
        if self.train.step % t.log_steps == 0 or self.train.step == t.max_steps:
            self.journal.step(self.step_record(loss, grad_norm, lr))

    def step_record(self, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> dict:
        """The logged step: loss averaged over ranks (a collective: every rank), the meter's window."""
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
        return record

    def maybe_evaluate(self) -> None:
        """The evaluation that belongs to this step, if one is due: part of the step, budgeted by the stop
        decision, recorded once (the evaluator is a checkpointed part)."""
        if not self.evaluator.due(self.train.step):
            return
        with self.clock.measure("eval"):
            record = self.evaluator.evaluate(self.train.step)
        seconds = self.clock.last["eval"]
        self.meter.exclude(seconds)
        self.journal.evaluation(record, seconds)

    # -- saving -----------------------------------------------------------------------------------------------
    def maybe_save(self) -> None:
        t = self.cfg.training
        if t.save_steps and self.train.step % t.save_steps == 0 and self.train.step < t.max_steps:
            self.save("periodic", asynchronous=t.async_save)

    def save(self, kind: str, asynchronous: bool = False) -> None:
        self.on_commit(self.ckpt.wait())  # the save in flight, if any
        if self.ckpt.last_saved_step != self.train.step:  # else this state is saved already
            self.clock.save_started(asynchronous)  # the stop decision budgets what a save in flight still needs
            self.on_commit(self.ckpt.save(self.train.step, kind, asynchronous))

    def on_commit(self, record: dict | None) -> None:
        if record is None:
            return
        overruled = self.clock.record_save(record["total_s"], record["async"], record["blocking_s"])
        self.journal.commit(events.Save.from_record(record))
        if self.ckpt.quarantine_removed:
            log.info(f"removed {', '.join(self.ckpt.quarantine_removed)}: damaged checkpoints whose steps are "
                     f"saved again")
            self.journal.event(events.QuarantineRemoved(names=self.ckpt.quarantine_removed))
            self.ckpt.quarantine_removed = []
        self.announce_save_budget(overruled, record["total_s"])
        space = self.ckpt.space_warning()  # the next save will not fit: say so now, with figures
        if space:
            log.warning(space)
            self.journal.event(events.DiskSpace(message=space))

    # -- how the launch ends ------------------------------------------------------------------------------------
    def run(self) -> int:
        end = self.run_loop()
        if end.end is End.COMPLETED:
            self.save("final")
            return self.finish(end, events.Complete)
        if end.end is End.STOPPED:
            self.save("shutdown")
            self.stop.clear_stop_file()
            return self.finish(end, events.Stop)
        self.save("shutdown")
        return self.finish(self.halt(end.exhausted), events.Halt)

    def finish(self, end: LoopEnd, event: type[events.Event]) -> int:
        """The status and the ending event; the exit code (1 where the run cannot go on as planned)."""
        if end.end is not End.HALTED:
            self.journal.not_halted()
        idle = self.idle_launches(end)
        step, tokens = self.train.step, self.train.tokens
        if idle > IDLE_CAP:  # saved where it started, as the ones before: say so, and stop the resubmissions
            reason = self.no_room(idle)
            self.journal.status(status=ERROR, reason=reason, error=reason, step=step, tokens=tokens,
                                idle_launches=idle)
            self.journal.end(events.Error(message=reason, step=step))
            log.error(reason)
            return 1
        self.journal.status(status=end.end.value, reason=end.reason, step=step, tokens=tokens, idle_launches=idle)
        self.journal.end(event(reason=end.reason, step=step, tokens=tokens))
        log.info(f"{end.end.value}: {end.reason}" + ("" if "step" in end.reason else f" at step {step}"))
        return 0

    def idle_launches(self, end: LoopEnd) -> int:
        """Launches in a row that reached their deadline before training a step: a job limit shorter than set-up
        and the reserve would otherwise be resubmitted forever, each launch saving where it started."""
        if end.end is not End.STOPPED or self.clock.steps_trained or not end.reason.startswith("deadline"):
            return 0
        idle = self.journal.idle_launches + 1
        left = self.clock.deadline.seconds_left(self.clock.process_start)
        log.warning(f"this launch reached its deadline before its first step ({idle} in a row): its job had "
                    f"{left or 0:.0f}s, set-up took {sum(self.clock.phases.values()):.0f}s and the reserve is "
                    f"{self.clock.reserve:g}s (training.walltime_reserve_seconds)")
        return idle

    def no_room(self, idle: int) -> str:
        return (f"{idle} launches in a row reached their deadline before training a step: the job's time limit "
                f"leaves no room after set-up ({sum(self.clock.phases.values()):.0f}s) and the reserve "
                f"({self.clock.reserve:g}s, training.walltime_reserve_seconds); give the job more time or lower "
                f"the reserve")

    def halt(self, e: BucketExhausted) -> LoopEnd:
        """A bucket ran dry (saved already): the HALTED marker says which, and what a person can do."""
        step = self.train.step
        if e.final:  # exhaustion was allowed, and no bucket of the phase is left: the flag cannot help
            reason = f"{e} (saved at step {step})"
        else:
            reason = (f"bucket {e.bucket!r} ran dry in phase {e.phase} at step {step + 1} ({e.tokens_short} "
                      f"tokens short of a sequence; saved at step {step}); rerun with "
                      f"--data.allow_bucket_exhaustion true to drop it and continue with "
                      f"{', '.join(e.remaining)} renormalised, or end the run there with "
                      f"--training.max_steps {step}")
        self.journal.halted({"bucket": e.bucket, "phase": e.phase, "step": step, "tokens_short": e.tokens_short,
                             "remaining_buckets": e.remaining, "reason": reason})
        return LoopEnd(End.HALTED, reason, e)
