"""One launch of a run, start to end: join the process group, take the run's lease, build the Trainer, train,
and when something fails, classify it and record how the launch ended.

A failure is one of: the user's (config, data, a checkpoint that cannot be used: one line, ERROR, exit 2), the
storage's (a full disk: one line, ERROR), the fabric's (a lost peer, a failed rendezvous, a collective timeout:
transient, recorded as a resumable STOPPED until TRANSIENT_CAP of them come in a row without progress), or a
bug (ERROR with its traceback). docs/orchestration.md has the table.
"""
from __future__ import annotations

import errno
import os
import traceback
from contextlib import ExitStack

import torch
import torch.distributed as dist

from gpt_simple import shutdown
from gpt_simple.checkpoint import CheckpointError, list_committed
from gpt_simple.clock import Clock
from gpt_simple.config import Config, ConfigError, validate_world
from gpt_simple.data import DataError, ShardError
from gpt_simple.drill import Drill, DrillError
from gpt_simple.journal import Journal, events, open_journal
from gpt_simple.lease import EXIT_HELD, Lease, LeaseHeld
from gpt_simple.lease import describe as describe_holder
from gpt_simple.checkpoint.failures import LoadUnavailable
from gpt_simple.parallel import (Dist, init_distributed, is_fabric_failure, make_deterministic, mesh_shape,
                                 set_collective_timeout, shutdown_distributed)
from gpt_simple.run_dir import RecordsError, RunDir
from gpt_simple.run_state import ERROR, STOPPED
from gpt_simple.runtime import log, setup_logging
from gpt_simple.trainer import Trainer
from gpt_simple.journal.wandb_sink import require_wandb
from gpt_simple.watchdog import GRACE_S as SETUP_WATCHDOG_GRACE_S
from gpt_simple.watchdog import SetupWatchdog

USER_ERRORS = (ConfigError, DataError, ShardError, CheckpointError, DrillError, RecordsError)
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}  # the storage, not a bug: no traceback


TRANSIENT_CAP = 3  # transient failures in a row with no step progress: then ERROR (a broken node must not loop)
EXIT_TRANSIENT = 1  # a transient failure exits non-zero, but its status (STOPPED, "transient: ...") says resume


class SetupFailed(Exception):
    """Set-up could not complete in time (a rank did not join, the store did not answer): transient."""


def is_transient(error: BaseException) -> bool:
    """A failure of the fabric (peer lost, rendezvous / connect failure, collective timeout), a set-up that could
    not complete, or a checkpoint that could not be read for a reason outside it: resubmitting can help. Bugs and
    user mistakes are not."""
    return isinstance(error, (SetupFailed, LoadUnavailable)) or is_fabric_failure(error)


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
    run_dir, d, journal, trainer = RunDir(cfg.training.output_dir), None, None, None
    holder = {}  # this launch's lease and journal, for the set-up watchdog (another thread)
    watchdog = SetupWatchdog(lambda name: stop_during_setup(name, holder, run_dir),
                             handled=lambda: shutdown.FLAGS.requested).start()
    t = cfg.training
    with ExitStack() as closing:
        closing.callback(shutdown_distributed)
        try:
            drill = Drill.from_environ()  # the test seam: a malformed value is refused before anything is built
            clock = Clock(shutdown.resolve_deadline(t.max_runtime_seconds), t.walltime_reserve_seconds, drill)
            clock.mark("imports")  # the interpreter, torch and the package, from the process start
            if t.deterministic:  # before CUDA starts (init_distributed picks the device)
                make_deterministic()
            world = os.environ.get("WORLD_SIZE", "1")
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            d = setup_step(f"the process group ({world} ranks, store at {where})", t.setup_timeout_seconds,
                           init_distributed, t.device, t.setup_timeout_seconds)
            clock.mark("process_group")
            validate_world(cfg, d.world_size)
            require_wandb(cfg)
            d.mesh_shape = mesh_shape(cfg.parallel.replicate_degree, d.world_size)
            journal = open_run(run_dir, d, t.resume, force, t.setup_timeout_seconds)
            holder["journal"] = journal
            if journal.lease is not None:
                closing.callback(journal.lease.release)
            journal.drop_torn_lines()  # before anything appends to the run's logs
            clock.mark("run_folder")  # the lease, the journal
            trainer = setup_step("every rank to build the trainer (set-up collectives)", t.setup_timeout_seconds,
                                 Trainer, cfg, d, journal, closing, clock)
            unavailable = set_collective_timeout(t.collective_timeout_seconds)
            if unavailable:  # a degraded guarantee: a lost peer is noticed after the set-up bound instead
                bound = t.setup_timeout_seconds
                log.warning(f"training.collective_timeout_seconds ({t.collective_timeout_seconds:g}) is not applied: "
                            f"{unavailable}; collectives keep the set-up bound of {bound:g}s")
                journal.event(events.CollectiveTimeoutUnavailable(seconds=t.collective_timeout_seconds,
                                                                  kept_s=bound, why=unavailable))
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
            step = journal.previous_step if journal is not None else 0
        return record_failure(error, code, show_traceback, run_dir, d, journal, step,
                              transient=is_transient(error))


def stop_during_setup(signal_name: str, holder: dict, run_dir: RunDir | None = None) -> None:
    """The watchdog's last act when a stop signal found set-up hung: rank 0 records STOPPED (resumable) and
    releases the lease. Runs on the watchdog thread; the process exits right after."""
    log.error(f"stop signal {signal_name} during set-up, which is blocked (waiting on other ranks) "
              f"{SETUP_WATCHDOG_GRACE_S:g}s after it: exiting now (set-up trains nothing, so nothing is lost)")
    journal = holder.get("journal")
    if journal is None and run_dir is not None and int(os.environ.get("RANK", 0)) == 0 and run_dir.path.is_dir():
        # Still forming the process group, before the lease: recorded as record_failure records a failed
        # rendezvous, if no other live job holds the run. Else a first launch would leave no state, which a
        # template reads as a failure, not as the resumable stop it is.
        try:
            journal = Journal(run_dir.path)
            journal.lease = Lease(run_dir.path).acquire()
        except Exception:  # noqa: BLE001 - held by another job, or unwritable: record nothing
            return
    if journal is None:
        return
    try:
        # set-up trained nothing: the run is where the previous launch left it
        reason, step = f"signal {signal_name} during set-up", journal.previous_step
        journal.status(status=STOPPED, reason=reason, step=step)
        journal.end(events.Stop(reason=reason, step=step))
    except Exception as e:  # noqa: BLE001 - the process is exiting either way
        log.error(f"could not record the stop in {run_dir.state if run_dir else 'run_state.json'} ({e})")
    if journal.lease is not None:
        journal.lease.release()


def record_failure(error: BaseException, code: int, show_traceback: bool, run_dir: RunDir, d: Dist | None,
                   journal: Journal | None, step: int, transient: bool = False) -> int:
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
    if journal is None and main and run_dir.path.is_dir():
        # refused before set-up got this far (e.g. resume = 'scratch', a failed rendezvous): record only if no
        # other live job holds the run
        try:
            lease = Lease(run_dir.path).acquire()
        except (LeaseHeld, OSError):
            return code
        journal = Journal(run_dir.path)
        step = journal.previous_step if transient else step
    try:
        if journal is not None:
            try:  # [save safety] on a full disk even this write can fail: say so once, no second traceback
                if transient:
                    _record_transient(journal, message, step)
                else:
                    journal.status(status=ERROR, reason=message, error=message, step=step)
                    journal.end(events.Error(message=message, step=step))
            except LeaseHeld as e:
                log.error(f"not recording the failure: {e}")
            except OSError as e:
                log.error(f"could not record ERROR in {run_dir.state} ({e.strerror or e}); its status is stale")
    finally:
        if lease is not None:
            lease.release()
    return code


def _record_transient(journal: Journal, message: str, step: int) -> None:
    s = journal.state.state
    last = s.get("transient_step")
    count = 1 if (last is not None and step > last) else int(s.get("transient_failures") or 0) + 1
    if count > TRANSIENT_CAP:
        reason = (f"{count} transient failures in a row with no step progress (cap {TRANSIENT_CAP}); "
                  f"the last: {message}")
        journal.status(status=ERROR, reason=reason, error=message, step=step, transient_failures=count,
                       transient_step=step)
        journal.end(events.Error(message=reason, step=step, transient=True))
        log.error(reason)
        return
    reason = f"transient: {message} ({count} of {TRANSIENT_CAP} in a row without progress)"
    journal.status(status=STOPPED, reason=reason, error=message, step=step, transient_failures=count,
                   transient_step=step)
    journal.end(events.TransientFailure(message=message, step=step, count=count))


def open_run(run_dir: RunDir, d: Dist, resume: str, force: bool, timeout_s: float = 300.0) -> Journal:
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
    journal = open_journal(run_dir.path, d.is_main)
    journal.lease = lease
    if lease is not None and lease.taken_over:
        journal.event(events.LeaseTakeover(previous=lease.taken_over))
    return journal
