"""`gpt-simple verify RUN_DIR --replay K`: the resume proof. Train K steps again from one of the run's committed
checkpoints, on the machine and world size this command runs on, and compare them step by step with what the
run itself recorded.

The replay is an ordinary launch of the real trainer in a scratch folder: the chosen checkpoint is copied into
SCRATCH/checkpoints/, and the run's own config.toml is loaded with output_dir = SCRATCH, resume = "auto" and
training.stop_at_step = step + K (max_steps stays, so the learning-rate schedule is the run's), so it goes through
exactly the production resume path. It takes the scratch folder's lease, never the run's, and nothing is written
under RUN_DIR. Then SCRATCH/metrics.jsonl is compared with RUN_DIR/metrics.jsonl: the loss, gradient norm and
learning rate of every step both logged, and every evaluation both recorded.

One verdict line, last: `exact` (every value equal), `within TOL` (the largest relative difference and where),
or `differs from step S` (the values); exit 0, 0 and 1. Before it, where the run's records of those steps came
from (which launch, its world size, whether it resumed from that checkpoint or trained through it).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gpt_simple.checkpoint import CheckpointInfo, list_committed
from gpt_simple.config import ConfigError, load_config
from gpt_simple.journal import events
from gpt_simple.run_dir import RunDir, read_jsonl

STEP_KEYS = ("loss", "grad_norm", "lr")  # what a logged step holds that the training computed (not timings)


class ReplayError(Exception):
    """Bad input: one line naming the option or file, exit 2."""


@dataclass
class Plan:
    run: RunDir
    checkpoint: CheckpointInfo
    steps: int  # replayed: at most K, no further than the run recorded
    asked: int  # K
    recorded: dict[int, dict]  # the run's logged steps in the range
    evaluations: dict[int, dict]  # the run's evaluations in the range

    @property
    def end(self) -> int:
        return self.checkpoint.step + self.steps


def choose_checkpoint(run: RunDir, start: str | None) -> CheckpointInfo:
    found = list_committed(run.checkpoints)
    if not found:
        raise ReplayError(f"{run.checkpoints}: no committed checkpoint to replay from")
    if start is None:
        return found[-1]
    exact = [c for c in found if c.name == start]
    by_step = [c for c in found if start.startswith("step-") and f"step-{c.step}" == start]
    if not (exact or by_step):
        raise ReplayError(f"--from {start}: no such committed checkpoint in {run.checkpoints} (there: "
                          f"{', '.join(c.name for c in found)})")
    return (exact or by_step)[-1]


def plan_replay(path: str, k: int, start: str | None) -> Plan:
    run = RunDir(path)
    if not run.path.is_dir():
        raise ReplayError(f"{run.path}: no such directory")
    if not run.config.exists():
        raise ReplayError(f"{run.config}: missing (not a run folder?)")
    if k < 1:
        raise ReplayError(f"--replay: must be >= 1 step, got {k}")
    ckpt = choose_checkpoint(run, start)
    records = [r for r in read_jsonl(run.metrics)
               if isinstance(r.get("step"), int) and ckpt.step < r["step"] <= ckpt.step + k]
    recorded = {r["step"]: r for r in records if r.get("type") != "eval"}
    evaluations = {r["step"]: r for r in records if r.get("type") == "eval"}
    if not recorded:
        raise ReplayError(f"{run.metrics}: no step after {ckpt.name} recorded: nothing to compare a replay with")
    steps = max(recorded) - ckpt.step
    return Plan(run, ckpt, steps, k, recorded, {s: e for s, e in evaluations.items() if s <= ckpt.step + steps})


# -- where the run's records came from --------------------------------------------------------------------------
def writers(run: RunDir) -> list[dict]:
    """The launches that trained (a setup event: they reached the loop), oldest first: {launch, start, resumed,
    world_size, mesh}. metrics.jsonl is trimmed to the resumed step by each launch, so a step's record is the one
    the last launch that started below it wrote."""
    records = read_jsonl(run.events)
    info: dict[int, dict] = {}
    for r in events.records_of(records, events.Launch):
        info[r.get("launch")] = {"launch": r.get("launch"), "start": 0, "resumed": None,
                                 "world_size": r.get("world_size"), "mesh": r.get("mesh")}
    for r in events.records_of(records, events.Resume):
        if r.get("launch") in info:
            info[r["launch"]].update(start=r.get("step", 0), resumed=r.get("checkpoint"))
    trained = {r.get("launch") for r in events.records_of(records, events.Setup)}
    return [v for n, v in sorted(info.items(), key=lambda kv: kv[0] or 0) if n in trained]


def provenance(plan: Plan, world_size: int) -> tuple[list[str], bool]:
    """One line per launch whose records the replay is compared with; whether any ran on another world size."""
    launches, lines, other_world = writers(plan.run), [], False
    by_launch: dict[int, list[int]] = {}
    for step in sorted(plan.recorded):
        writer = next((w for w in reversed(launches) if w["start"] < step), None)
        by_launch.setdefault(writer["launch"] if writer else 0, []).append(step)
    for number, steps in by_launch.items():
        w = next((w for w in launches if w["launch"] == number), None)
        span = f"steps {steps[0]}-{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}"
        if w is None:
            lines.append(f"the run recorded {span} in a launch events.jsonl does not describe")
            continue
        how = (f"which resumed from {plan.checkpoint.name}" if w["resumed"] == plan.checkpoint.name
               else f"which trained through step {plan.checkpoint.step} (it started from "
                    f"{w['resumed'] or 'scratch'})")
        other_world |= w["world_size"] != world_size
        same = "the same world size" if w["world_size"] == world_size else \
            f"a different world size: replayed on {world_size}"
        lines.append(f"the run recorded {span} in launch {number} (world size {w['world_size']}, mesh "
                     f"{w['mesh']}), {how}; {same}")
    return lines, other_world


# -- the comparison ----------------------------------------------------------------------------------------------
def pairs(plan: Plan, replayed: list[dict]):
    """(step, what, run's value, replay's value) in step order; a step or evaluation the replay lacks is an
    error."""
    mine = {r["step"]: r for r in replayed if r.get("type") != "eval" and "step" in r}
    my_evals = {r["step"]: r for r in replayed if r.get("type") == "eval" and "step" in r}
    for step in sorted(set(plan.recorded) | set(plan.evaluations)):
        if step in plan.recorded:
            if step not in mine:
                raise ReplayError(f"the replay logged no step {step} (the run did)")
            for key in STEP_KEYS:
                yield step, key, plan.recorded[step].get(key), mine[step].get(key)
        if step in plan.evaluations:
            if step not in my_evals:
                raise ReplayError(f"the replay recorded no evaluation at step {step} (the run did)")
            theirs, ours = plan.evaluations[step], my_evals[step]
            yield step, "eval loss", theirs.get("loss"), ours.get("loss")
            for bucket, value in sorted((theirs.get("loss_by_bucket") or {}).items()):
                yield step, f"eval loss {bucket}", value, (ours.get("loss_by_bucket") or {}).get(bucket)


def relative(a, b) -> float:
    if a == b:
        return 0.0
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return float("inf")
    return abs(a - b) / max(abs(a), abs(b))


def verdict(plan: Plan, replayed: list[dict], tol: float) -> tuple[int, str]:
    worst = (0.0, None, None)
    for step, key, theirs, ours in pairs(plan, replayed):
        diff = relative(theirs, ours)
        if diff > tol or (tol == 0 and theirs != ours):
            return 1, f"differs from step {step}: {key} {theirs!r} (run) vs {ours!r} (replay)"
        if diff > worst[0]:
            worst = (diff, step, key)
    n_eval = len(plan.evaluations)
    what = f"{len(plan.recorded)} logged steps ({', '.join(STEP_KEYS)}) and {n_eval} evaluation(s)"
    if worst[1] is None:
        return 0, f"exact: {what} equal"
    return 0, f"within {tol:g}: {what}; largest relative difference {worst[0]:.3g} ({worst[2]} at step {worst[1]})"


# -- the scratch run ---------------------------------------------------------------------------------------------
def scratch_path(given: str | None, rank: int) -> tuple[Path, bool]:
    """(the scratch folder, whether to remove it after). Every rank names the same one without a process group:
    torchrun's run id and port are the same on every rank of the job."""
    if given:
        path = Path(given)
        if rank == 0 and path.exists() and any(path.iterdir()):
            raise ReplayError(f"--scratch {path}: not empty (name a new or empty folder)")
        return path, False
    world = os.environ.get("WORLD_SIZE", "1")
    if int(world) > int(os.environ.get("LOCAL_WORLD_SIZE", world)):
        raise ReplayError("--scratch: needed across nodes (a folder on storage every node sees)")
    if "MASTER_PORT" not in os.environ:
        return Path(tempfile.mkdtemp(prefix="gpt-simple-replay-")), True
    job = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'job')}-{os.environ['MASTER_PORT']}"
    return Path(tempfile.gettempdir()) / f"gpt-simple-replay-{job}", True


def prepare(plan: Plan, scratch: Path) -> None:
    """Rank 0, before the process group forms (so before any other rank reads it): the checkpoint, copied."""
    target = scratch / "checkpoints" / plan.checkpoint.name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(plan.checkpoint.path, target)
    except OSError as e:
        raise ReplayError(f"--scratch {scratch}: cannot copy {plan.checkpoint.name} there ({e})") from None


def replay_config(plan: Plan, scratch: Path):
    """The run's own config.toml, pointed at the scratch folder and stopped after the replayed steps. Nothing that
    changes the numbers changes: max_steps (the schedule), batch, data, model, seeds stay."""
    overrides = {"training.output_dir": str(scratch), "training.resume": "auto",
                 "training.stop_at_step": plan.end, "training.save_steps": 0, "training.tensorboard": False,
                 "wandb.enabled": False}
    cfg = load_config(plan.run.config, [item for k, v in overrides.items() for item in (f"--{k}", json.dumps(v))])
    cache = cfg.training.compile_cache_dir
    if cache not in ("", "auto") and Path(cache).resolve().is_relative_to(plan.run.path.resolve()):
        cfg.training.compile_cache_dir = "auto"  # a cache inside RUN_DIR: the replay must not write there
    return cfg


def say(rank: int, line: str, err: bool = False) -> None:
    if rank == 0:
        print(line, file=sys.stderr if err else sys.stdout, flush=True)


def replay_main(args) -> int:
    """`gpt-simple verify RUN_DIR --replay K [--from step-N] [--scratch DIR] [--tol T]` on every rank."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        if args.tol < 0 or args.tol != args.tol:
            raise ReplayError(f"--tol: must be a relative tolerance >= 0, got {args.tol}")
        plan = plan_replay(args.path, args.replay, args.start)
        scratch, temporary = scratch_path(args.scratch, rank)
        cfg = replay_config(plan, scratch)
    except (ReplayError, ConfigError) as e:
        say(rank, f"error: {e}", err=True)
        return 2
    try:
        return run_and_compare(plan, cfg, scratch, rank, world, args.tol)
    finally:
        if temporary and rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)


def run_and_compare(plan: Plan, cfg, scratch: Path, rank: int, world: int, tol: float) -> int:
    first, last = plan.checkpoint.step + 1, plan.end
    say(rank, f"replay: {plan.checkpoint.name} of {plan.run.path}: steps {first}-{last} on world size {world}, "
              f"in {scratch}")
    if plan.steps < plan.asked:
        say(rank, f"replay: the run recorded steps only up to {last}: replaying {plan.steps} of the "
                  f"{plan.asked} asked")
    if rank == 0:
        try:
            prepare(plan, scratch)
        except ReplayError as e:
            say(rank, f"error: {e}", err=True)
            return 2
    from gpt_simple.launch import run  # torch and the trainer: only now
    code = run(cfg)
    if rank != 0:
        return code  # rank 0 says the verdict (torchrun's exit code follows it)
    if code != 0:
        say(rank, f"error: the replay's training failed (exit {code}; its reason is above, its records in "
                  f"{scratch})", err=True)
        return 2
    lines, other_world = provenance(plan, world)
    for line in lines:
        say(rank, f"replay: {line}")
    try:
        code, line = verdict(plan, read_jsonl(RunDir(scratch).metrics), tol)
    except ReplayError as e:
        say(rank, f"error: {e}", err=True)
        return 1
    if code and other_world:  # FSDP's reductions add in another order on another world size: last bits differ
        line += (" (recorded on another world size, whose reductions add in another order: replay on the run's "
                 "world size for `exact`, or pass --tol, e.g. 1e-5)")
    say(rank, line)
    return code
