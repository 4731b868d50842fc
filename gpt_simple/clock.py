"""How long things take, and when to stop: the one owner of a run's measured durations.

The clock times set-up, checkpoint loads, steps, evaluations and saves (sync and async); it carries the figures
that budget a stop (`carried()`, kept in run_state.json's "durations") to the next launch; and it does the stop
arithmetic: a launch stops at a step boundary when now + reserve + the next step (+ its evaluation, if one is
due) reaches the deadline, the reserve being the larger of training.walltime_reserve_seconds and the measured
save time with a margin, plus what a save in flight still needs. It decides nothing by itself: `near_deadline`
is one rank's vote, which the trainer agrees over ranks. Nothing else keeps a duration.

The test seam (gpt_simple/drill.py) is injected here: `step_ended` pauses for a drilled step.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

from gpt_simple.drill import NO_DRILL, PARTS, Drill
from gpt_simple.run_state import MIN_STALE_S
from gpt_simple.shutdown import PROCESS_START, Deadline

# The measured save time is budgeted with this margin (a save can be slower than the last one: more load, a
# busier filesystem).
SAVE_MARGIN = 1.5
CARRIED = ("save_sync", "save_async", "eval")  # what budgets the next launch's first stop decision


class Clock:
    def __init__(self, deadline: Deadline, reserve_seconds: float, drill: Drill = NO_DRILL,
                 process_start: float = PROCESS_START):
        self.deadline, self.reserve, self.drill = deadline, reserve_seconds, drill
        self.process_start = process_start
        self.last: dict[str, float] = {}  # the latest duration of each kind: step, eval, save_sync, load, setup ...
        self.in_flight_since: float | None = None  # epoch seconds an async save started, while it runs
        self.overruled = False  # the measured save has overruled the configured reserve (warned once a launch)
        self.step_start = 0.0  # perf_counter at the start of the step in progress
        self.step_saving = 0.0  # of the step in progress, the seconds it waited for a save
        self.phases: dict[str, float] = {}  # set-up, phase by phase (mark)
        self._last_mark = process_start
        self.spent = {"step": 0.0, "eval": 0.0, "save": 0.0}  # this launch's sums, for the ledger
        self.steps_trained = 0

    # -- measuring --------------------------------------------------------------------------------------------
    def record(self, kind: str, seconds: float) -> None:
        self.last[kind] = seconds

    @contextmanager
    def measure(self, kind: str):
        """Time the block as `kind` (a drilled kind, e.g. "eval", is slowed by the drill inside the block)."""
        start = time.perf_counter()
        yield
        if kind in PARTS:
            self.drill.pause(kind)
        self.record(kind, time.perf_counter() - start)
        if kind in self.spent:
            self.spent[kind] += self.last[kind]

    def mark(self, phase: str, now: float | None = None) -> None:
        """Set-up phase `phase` ends now: it took the time since the previous mark (the first: since the
        process started)."""
        now = time.time() if now is None else now
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last_mark
        self._last_mark = now

    def setup_done(self, now: float | None = None) -> float:
        """Process start to the first step (imports, process group, model, data, checkpoint load); what no mark
        claimed is phase "other"."""
        now = time.time() if now is None else now
        self.mark("other", now)
        seconds = now - self.process_start
        self.record("setup", seconds)
        return seconds

    def step_started(self) -> None:
        self.step_start = time.perf_counter()

    def waited_for_save(self, seconds: float) -> None:
        """Part of the step in progress waited for a save (its staging copy): that is the save's blocking time,
        which the ledger counts under saves, so not under training too."""
        self.step_saving += seconds

    def step_ended(self) -> None:
        self.drill.pause("step")
        self.record("step", time.perf_counter() - self.step_start)  # all of it: it budgets the next step
        self.spent["step"] += self.last["step"] - self.step_saving
        self.step_saving = 0.0
        self.steps_trained += 1

    @property
    def step_seconds(self) -> float:
        return self.last.get("step", 0.0)

    def ledger(self, now: float | None = None) -> dict:
        """Where this launch's time went so far: process start to now, in set-up, steps, evaluations, the part
        of saves that blocked the loop, and the rest."""
        total = (time.time() if now is None else now) - self.process_start
        setup = self.last.get("setup", total)  # a launch that never reached its first step: all set-up
        spent = {"train_s": self.spent["step"], "eval_s": self.spent["eval"], "save_s": self.spent["save"]}
        return {"total_s": total, "setup_s": setup, **spent, "steps": self.steps_trained,
                "other_s": max(0.0, total - setup - sum(spent.values()))}

    # -- carried across launches (run_state.json "durations") ---------------------------------------------------
    def carried(self) -> dict[str, float]:
        return {f"{k}_s": v for k, v in sorted(self.last.items())}

    def carry_over(self, previous: dict | None) -> str | None:
        """The previous launch's figures: a resumed launch has measured nothing yet, and its first stop decision
        would otherwise trust the configured reserve alone. Returns the warning when its save time overrules
        the reserve (said once per launch, as record_save says it), else None."""
        for kind in CARRIED:
            value = float((previous or {}).get(f"{kind}_s") or 0)
            if value > 0 and not self.last.get(kind):
                self.last[kind] = value
        return self._overruled(f"the previous launch measured a save of {self.measured_save():.1f}s", "keeps")

    # -- saves -------------------------------------------------------------------------------------------------
    def save_started(self, asynchronous: bool, now: float | None = None) -> None:
        self.in_flight_since = (time.time() if now is None else now) if asynchronous else None

    def record_save(self, total_seconds: float, asynchronous: bool, blocking_seconds: float = 0.0) -> str | None:
        """A save committed: remember its time (and what it blocked the loop, for the ledger). Returns a warning
        the first time the measured figure overrules the configured reserve (the caller logs it), else None."""
        self.record("save_async" if asynchronous else "save_sync", total_seconds)
        self.spent["save"] += blocking_seconds
        self.in_flight_since = None
        return self._overruled(f"a save took {total_seconds:.1f}s ({'async' if asynchronous else 'sync'})",
                               "now keeps")

    def _overruled(self, measured: str, keeps: str) -> str | None:
        """The warning, once a launch, when the measured save time overrules the configured reserve."""
        budget = self.save_budget()
        if budget <= self.reserve or self.overruled or self.deadline.at is None:
            return None
        self.overruled = True
        return (f"{measured}, more than training.walltime_reserve_seconds = {self.reserve:g} allows: the stop "
                f"decision {keeps} {budget:.1f}s ({SAVE_MARGIN:g} x the measured save) before the deadline; set "
                f"the reserve to at least {budget:.0f}")

    def measured_save(self) -> float:
        """What the shutdown save will cost: the last synchronous save, else the last async one."""
        return self.last.get("save_sync") or self.last.get("save_async") or 0.0

    def save_budget(self) -> float:
        return max(self.reserve, SAVE_MARGIN * self.measured_save())

    def reserve_seconds(self, save_in_flight: bool = False, now: float | None = None) -> float:
        """Seconds to keep before the deadline: the save budget plus what a save in flight still needs."""
        budget = self.save_budget()
        if save_in_flight and self.in_flight_since is not None:
            expected = SAVE_MARGIN * (self.last.get("save_async") or self.last.get("save_sync") or 0.0)
            elapsed = (time.time() if now is None else now) - self.in_flight_since
            budget += max(0.0, expected - elapsed)
        return budget

    # -- the stop arithmetic --------------------------------------------------------------------------------------
    def expected_eval_seconds(self, eval_tokens: int, tokens_per_step: int) -> float:
        """An evaluation due after the next step: the last one's duration (carried across launches), or before
        any, half a training step per step's worth of tokens (a forward pass alone is about a third of one), so
        that a first evaluation is not left out of the budget."""
        if self.last.get("eval"):
            return self.last["eval"]
        return self.step_seconds * eval_tokens / max(tokens_per_step, 1) / 2

    def near_deadline(self, next_step_seconds: float, save_in_flight: bool = False,
                      now: float | None = None) -> bool:
        """This rank's vote: the deadline leaves no room for the next step (and its evaluation) and a save."""
        left = self.deadline.seconds_left(now)
        return left is not None and left <= self.reserve_seconds(save_in_flight, now) + next_step_seconds

    def stale_after_s(self) -> float:
        """How long run_state.json's heartbeat may be silent before readers call the run CRASHED: a step or a
        save can legitimately take this long between two heartbeats."""
        saves = max(self.last.get("save_sync", 0.0), self.last.get("save_async", 0.0))
        return max(MIN_STALE_S, 10 * self.step_seconds + 2 * saves)


class ThroughputMeter:
    """The logging window of one launch: tokens/s, MFU, the share of time waiting for data; and when the next
    heartbeat is due."""

    HEARTBEAT_EVERY_S = 2.0

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float, world_size: int):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak_total = peak_flops * world_size
        self._last_heartbeat = 0.0
        self.reset_window()

    def reset_window(self) -> None:
        self._window_start, self._window_tokens, self._data_wait = time.perf_counter(), 0, 0.0

    def batch_ready(self, step_start: float) -> None:
        """The step that started at `step_start` (perf_counter) has its batch: the wait counts as data wait."""
        self._data_wait += time.perf_counter() - step_start

    def step_trained(self) -> None:
        self._window_tokens += self.tokens_per_step

    def exclude(self, seconds: float) -> None:
        """Time spent outside training (an evaluation) does not count against the window's tokens/s."""
        self._window_start += seconds

    def window(self) -> dict:
        """tokens/s, MFU and data-wait share since the last window; starts the next one."""
        seconds = max(time.perf_counter() - self._window_start, 1e-9)
        tokens_per_s = self._window_tokens / seconds
        mfu = self.flops_per_token * tokens_per_s / self.peak_total if self.peak_total else None
        figures = {"tokens_per_s": tokens_per_s, "mfu": mfu, "data_wait_frac": self._data_wait / seconds}
        self.reset_window()
        return figures

    def heartbeat_due(self) -> bool:
        now = time.time()
        if now - self._last_heartbeat > self.HEARTBEAT_EVERY_S:
            self._last_heartbeat = now
            return True
        return False
