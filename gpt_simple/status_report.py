"""Read a run's status for people and orchestrators (read-only; the trainer alone writes the state).

Exit codes: 0 a state was read (whatever the status), 2 usage error, 3 no run in that directory,
4 the state file is corrupt.

Given a folder that holds runs rather than being one (`status.py outputs/`), it lists the runs found up to two
levels below, one line each: status word, step/max_steps, path.

`--decision` is for orchestrators (slurm/resume_chain.sh, k8s/job.yaml and scripts/local_loop.sh decide from it
alone): it prints one line, three fields separated by a TAB,

    WORD<TAB>ACTION<TAB>reason

and exits 0 whenever it printed that line (2 on a usage error). WORD is the status word, or NONE (no
run_state.json in OUTDIR: no run yet) or UNREADABLE (a corrupt state file). ACTION is what to do next, one
word from ACTIONS below (start, resume, done, halted, failed, held), and DECISIONS maps each WORD to it; `held`
overrides start/resume/failed while a live job holds the run's lease (gpt_simple/lease.py). reason is
free text on one line (tabs and line breaks become spaces), never empty. A shell reads it with
`IFS=$'\t' read -r STATUS ACTION REASON`; an orchestrator that finds no such line (python failed to start)
should act as on `failed`. New outcomes are a new ACTIONS entry and DECISIONS row, plus a branch for them in each
template's `case $ACTION`, where an action a template does not know falls to the `failed` branch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from gpt_simple.fileio import read_jsonl
from gpt_simple.journal.events import PlanAmended
from gpt_simple.lease import describe as describe_holder
from gpt_simple.lease import live_holder
from gpt_simple.run_dir import RunDir, is_run, quarantined
from gpt_simple.run_state import (COMPLETED, CRASHED, ERROR, HALTED, RUNNING, STOPPED, StateFileError,
                                  effective_status, read_state)

EXIT_OK, EXIT_USAGE, EXIT_NO_RUN, EXIT_CORRUPT = 0, 2, 3, 4

# --decision: what an orchestrator does next. The only place the templates' decision lives (see the docstring).
NONE, UNREADABLE = "NONE", "UNREADABLE"  # the words for "no run yet" and "corrupt state file"
ACTIONS = {
    "start": "no run yet: train; a new run starts",
    "resume": "train again: the trainer resumes from the newest committed checkpoint",
    "done": "the run is finished: stop, successfully",
    "halted": "a data bucket ran dry: stop, a person decides (docs/orchestration.md)",
    "failed": "retrying cannot help: stop, do not resubmit, read the logs",
    "held": "another live job holds this run (its lease): do not train now; neither success nor failure",
}
DECISIONS = {
    NONE: "start",
    STOPPED: "resume",
    RUNNING: "resume",  # a fresh heartbeat: another launch's, or one whose end is not yet detectable
    COMPLETED: "done",
    HALTED: "halted",
    ERROR: "failed",
    CRASHED: "failed",  # resumable, but a crash that repeats would loop: a person decides
    UNREADABLE: "failed",
}


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds / 3600:.1f}h ago"


def summary(state: dict, status: str, why: str | None, now: float) -> str:
    lines = [status,
             f"step      {state.get('step')}/{state.get('max_steps')}  tokens {state.get('tokens')}",
             f"checkpoint {state.get('last_checkpoint') or 'none'}",
             f"reason    {why or state.get('reason')}",
             f"heartbeat {_ago(now - float(state.get('heartbeat_at') or 0))} "
             f"(pid {state.get('pid')} on {state.get('host')}, launch {state.get('launches')})",
             f"deadline  from {state.get('deadline_source')}"]
    ev = state.get("eval")
    if ev:
        buckets = " ".join(f"{b} {v:.4f}" for b, v in ev.get("loss_by_bucket", {}).items())
        lines.append(f"eval      step {ev['step']}: val loss {ev['loss']:.4f}, ppl {ev['ppl']:.2f} ({buckets})")
    return "\n".join(lines)


def goodput(output_dir: Path) -> str | None:
    """The report's one-line goodput (`gpt-simple report` has the whole ledger), or None before any ledger."""
    from gpt_simple.report import goodput_line
    try:
        return goodput_line(output_dir)
    except (OSError, ValueError, KeyError, TypeError) as e:  # status still answers, and says why not this
        return f"unavailable ({type(e).__name__}: {e} reading {RunDir(output_dir).events})"


def amendments(output_dir: Path) -> list[dict]:
    """The data plan's amendments (plan_amended events; a launch that re-made one counts once), oldest first."""
    try:
        rows = read_jsonl(RunDir(output_dir).events)
    except (OSError, ValueError):
        return []
    return list({e["number"]: e for e in rows if e["event"] == PlanAmended.kind}.values())


def plan_line(found: list[dict]) -> str:
    return f"plan {found[-1]['number']}: " + " | ".join(
        f"amendment {e['number']} after step {e['step']}: {'; '.join(e['changes'])}" for e in found)


def decision(output_dir: Path, now: float | None = None) -> tuple[str, str, str]:
    """(WORD, ACTION, reason) for `--decision`: what an orchestrator does next with the run in output_dir."""
    try:
        state = read_state(Path(output_dir))
    except FileNotFoundError:
        word, why = NONE, f"{output_dir}: no run yet (no run_state.json)"
    except StateFileError as e:
        word, why = UNREADABLE, f"cannot read the run status: {e}"
    else:
        word, why = effective_status(state, time.time() if now is None else now)
        why = why or state.get("reason")
    action = DECISIONS.get(word, "failed")
    holder = live_holder(output_dir, now)
    if holder is not None and action in ("start", "resume", "failed"):
        # a live job holds the lease (e.g. the state looks CRASHED from here, but the job is alive elsewhere)
        action, why = "held", f"another job holds this run: {describe_holder(holder, now)}"
    reason = " ".join(str(why or "").split()) or "no reason recorded"  # one line, no tabs
    return word, action, reason


def runs_below(folder: Path, depth: int = 2) -> list[Path]:
    found = []
    for level in range(1, depth + 1):
        found += [p for p in folder.glob("/".join(["*"] * level)) if is_run(p)]
    return sorted(found)


def list_runs(folder: Path, as_json: bool) -> int:
    """One line per run under a parent folder; a corrupt run is listed as CORRUPT, not fatal."""
    rows, now = [], time.time()
    for run in runs_below(folder):
        try:
            state = read_state(run)
        except StateFileError as e:
            rows.append({"output_dir": str(run), "status": "CORRUPT", "reason": str(e)})
            continue
        status, why = effective_status(state, now)
        rows.append({"output_dir": str(run), "status": status, "step": state.get("step"),
                     "max_steps": state.get("max_steps"), "reason": why or state.get("reason")})
    if not rows:
        print(f"error: {folder}: no run here (no run_state.json in it or in the folders below it)", file=sys.stderr)
        return EXIT_NO_RUN
    if as_json:
        print(json.dumps(rows, indent=1))
    for row in rows if not as_json else []:
        print(f"{row['status']:<10} {row.get('step')}/{row.get('max_steps')}  {row['output_dir']}")
    return EXIT_OK


def status_main(argv: list[str]) -> int:
    try:
        return _status(argv)
    except BrokenPipeError:  # `status.py OUT | head -1`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt-simple status", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", nargs="?", help="the run's output_dir")
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", help="the run's output_dir")
    parser.add_argument("--json", action="store_true", help="print the full state as JSON")
    parser.add_argument("--decision", action="store_true",
                        help="print one line WORD<TAB>ACTION<TAB>reason for orchestrators (see above)")
    return parser


def _status(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    out = args.output_dir or args.dir
    if not out:
        print("error: give the run's output directory (status.py OUTDIR or --output-dir OUTDIR)", file=sys.stderr)
        return EXIT_USAGE
    if args.decision:
        print("\t".join(decision(Path(out))))
        return EXIT_OK
    if Path(out).is_dir() and not is_run(out):
        return list_runs(Path(out), args.json)
    try:
        state = read_state(Path(out))
    except FileNotFoundError:
        print(f"error: {out}: no run here (no run_state.json)", file=sys.stderr)
        return EXIT_NO_RUN
    except StateFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CORRUPT
    now = time.time()
    status, why = effective_status(state, now)
    amended = amendments(Path(out))
    if args.json:
        print(json.dumps({**state, "status": status, "recorded_status": state["status"], "status_reason": why,
                          "quarantined": [n for n, _ in quarantined(RunDir(out).checkpoints)],
                          "data_plan_amendments": amended}, indent=1))
    else:
        line = goodput(Path(out))
        aside = quarantined(RunDir(out).checkpoints)
        print(summary(state, status, why, now) + (f"\ngoodput   {line}" if line else "") +
              (f"\ndata      {plan_line(amended)}" if amended else "") +
              (f"\ndamaged   {', '.join(n for n, _ in aside)} (moved aside, never loaded; removed once newer saves "
               f"commit)" if aside else ""))
    return EXIT_OK
