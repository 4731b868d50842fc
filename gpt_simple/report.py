"""`gpt-simple report RUN_DIR [--json] [--html FILE]`: where a run's time went, launch by launch, and its goodput.

Everything comes from the journal's records in events.jsonl (never from console text): each launch's `launch`
event (its process start, and when the launch before it was last heard of), its `setup` phases, its `ledger`
(written as it ends: set-up, training steps, evaluations, the blocking part of saves, the rest), how it ended,
and the `replay` of the launch after it (the steps it trained past its last committed checkpoint: lost work).

A launch killed before it could write its ledger (SIGKILL, a lost node) is accounted from what is known: its
start, its last write (the next launch's `previous_seen_at`), its set-up; the rest of its time counts as training
and its lost steps are taken off. The report says which launches are such estimates.

Goodput = the time of training steps that count (trained and not lost) / the launches' time; the calendar
goodput divides by the run's whole span instead, queue time between launches included.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gpt_simple.journal.events import (ENDINGS, Complete, Error, Halt, Launch, Ledger, Replay, Setup, Stop,
                                      TransientFailure)
from gpt_simple.run_dir import RunDir, is_run, read_jsonl

PARTS = ("setup_s", "train_s", "eval_s", "save_s", "other_s")


def _by_launch(records: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for e in records:
        out.setdefault(int(e.get("launch") or 0), []).append(e)
    return out


def _ending(launch_events: list[dict]) -> str:
    ends = [e for e in launch_events if e["event"] in (*ENDINGS, TransientFailure.kind)]
    if not ends:
        return "killed (no end recorded)"
    e = ends[-1]
    reason = e.get("reason") or e.get("message") or ""
    word = {Complete.kind: "completed", Stop.kind: "stopped", Halt.kind: "halted", Error.kind: "error",
            TransientFailure.kind: "transient failure"}[e["event"]]
    return f"{word}: {reason}" if reason and word != "completed" else word


def launches(run_dir: Path) -> list[dict]:
    """One row per launch: start, end, where its time went, lost work, the gap before it, how it ended."""
    grouped = _by_launch(read_jsonl(RunDir(run_dir).events))
    numbers = sorted(n for n in grouped if n > 0)
    rows = []
    for i, n in enumerate(numbers):
        evs = grouped[n]
        first = next((e for e in evs if e["event"] == Launch.kind), evs[0])
        start = float(first.get("started_at") or first["time"])
        ledger = next((e for e in evs if e["event"] == Ledger.kind), None)
        setup = next((e for e in evs if e["event"] == Setup.kind), None)
        later = next((grouped[m] for m in numbers[i + 1:]), None)
        next_launch = next((e for e in later or [] if e["event"] == Launch.kind), None)
        replay = next((e for e in later or [] if e["event"] == Replay.kind), None)
        if ledger is not None:
            end, parts, steps, estimated = start + float(ledger["total_s"]), {k: float(ledger[k]) for k in PARTS}, \
                int(ledger["steps"]), False
        else:  # killed before its ledger: its last write, its set-up, the rest counted as training
            seen = (next_launch or {}).get("previous_seen_at")
            end = max(float(seen or 0), max(float(e["time"]) for e in evs))
            setup_s = min(float(setup["setup_s"]), end - start) if setup else end - start
            parts = {"setup_s": setup_s, "train_s": max(0.0, end - start - setup_s), "eval_s": 0.0,
                     "save_s": 0.0, "other_s": 0.0}
            steps, estimated = None, True
        lost_s = float(replay["seconds"]) if replay else 0.0
        previous_end = rows[-1]["end"] if rows else None
        rows.append({"launch": n, "start": start, "end": end, "total_s": end - start, **parts, "steps": steps,
                     "lost_steps": int(replay["steps"]) if replay else 0, "lost_s": min(lost_s, parts["train_s"]),
                     "gap_before_s": (start - previous_end) if previous_end is not None else None,
                     "phases": (setup or {}).get("phases", {}), "ending": _ending(evs), "estimated": estimated})
    return rows


def summary(rows: list[dict]) -> dict:
    if not rows:
        return {"launches": 0}
    launch_s = sum(r["total_s"] for r in rows)
    useful_s = sum(r["train_s"] - r["lost_s"] for r in rows)
    calendar_s = rows[-1]["end"] - rows[0]["start"]
    totals = {k: sum(r[k] for r in rows) for k in (*PARTS, "lost_s", "total_s")}
    return {"launches": len(rows), "launch_s": launch_s, "calendar_s": calendar_s,
            "queue_s": sum(r["gap_before_s"] or 0 for r in rows), "useful_train_s": useful_s,
            "goodput": useful_s / launch_s if launch_s > 0 else None,
            "calendar_goodput": useful_s / calendar_s if calendar_s > 0 else None,
            "totals": totals, "estimated_launches": [r["launch"] for r in rows if r["estimated"]]}


def goodput_line(run_dir: Path) -> str | None:
    """One line for status.py, or None where the run has no ledger yet."""
    rows = launches(run_dir)
    s = summary(rows)
    if not rows or s["goodput"] is None:
        return None
    return (f"{s['goodput']:.3f} of {len(rows)} launch(es)' {_secs(s['launch_s'])}, {s['calendar_goodput']:.3f} "
            f"of the calendar {_secs(s['calendar_s'])} (gpt-simple report: where the rest went)")


def _secs(x: float | None) -> str:
    if x is None:
        return "-"
    if x < 120:
        return f"{x:.1f}s"
    return f"{x / 60:.1f}m" if x < 7200 else f"{x / 3600:.2f}h"


def format_text(run_dir: Path, rows: list[dict], s: dict) -> str:
    lines = [f"run {run_dir}: {s['launches']} launch(es); goodput {s['goodput']:.3f} (training that counts / "
             f"launch time {_secs(s['launch_s'])}), {s['calendar_goodput']:.3f} of the calendar "
             f"({_secs(s['calendar_s'])}, {_secs(s['queue_s'])} between launches)", ""]
    head = ("launch", "started", "total", "set-up", "train", "eval", "saves", "other", "lost", "gap before", "end")
    table = [head]
    for r in rows:
        started = time.strftime("%m-%d %H:%M:%S", time.localtime(r["start"]))
        lost = f"{_secs(r['lost_s'])} ({r['lost_steps']} st)" if r["lost_steps"] else "-"
        table.append((f"{r['launch']}{'*' if r['estimated'] else ''}", started, _secs(r["total_s"]),
                      *(_secs(r[k]) for k in PARTS), lost, _secs(r["gap_before_s"]), r["ending"]))
    t = s["totals"]
    table.append(("total", "", _secs(t["total_s"]), *(_secs(t[k]) for k in PARTS), _secs(t["lost_s"]),
                  _secs(s["queue_s"]), ""))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head) - 1)]
    for row in table:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) + "  " + str(row[-1]))
    if s["estimated_launches"]:
        lines += ["", "* no ledger recorded (killed, or run by a gpt-simple without one): its time after set-up is "
                      "counted as training, less the steps the next launch trained again"]
    return "\n".join(lines)


def build_parser():
    from gpt_simple.cli import AliasArgumentParser
    p = AliasArgumentParser(prog="gpt-simple report", description="Where a run's time went, and its goodput.")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="the ledger as JSON")
    p.add_argument("--html", metavar="FILE", help="also draw it: losses against step and wall-clock time with "
                                                   "each launch marked, throughput, where the time went")
    return p


def report_main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    run_dir = Path(a.run_dir)
    if not is_run(run_dir) or not RunDir(run_dir).events.exists():
        print(f"error: {run_dir}: not a gpt-simple run folder (no events.jsonl)", file=sys.stderr)
        return 2
    rows = launches(run_dir)
    s = summary(rows)
    if not rows:
        print(f"error: {run_dir}: no launch recorded in events.jsonl", file=sys.stderr)
        return 2
    if a.html:
        from gpt_simple.report_html import MissingPlotting, write_html
        try:
            write_html(Path(a.html), run_dir, rows, s)
        except MissingPlotting as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    print(json.dumps({"launches": rows, "summary": s}, indent=1) if a.json else format_text(run_dir, rows, s))
    if a.html:
        print(f"wrote {a.html}", file=sys.stderr)
    return 0
