"""Rows and the table every benchmark prints: metric, ours, baseline (measured in the same run), ratio, target.

A row is a dict {"metric", "ours", "baseline", "ratio", "target", "ok", "unit", "note", ...}; `--json` writes
the rows as they are, with a description of the machine.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from bench.stats import check_target, fmt
from gpt_simple.fileio import strict_json


def row(metric: str, ours, baseline, ratio, target: str, unit: str = "", note: str = "", **extra) -> dict:
    """One line of the table. `target` is '≥ 0.95', '≤ 1%', '≤ 1.2x', 'report' (no target) or 'skipped'."""
    return {"metric": metric, "ours": ours, "baseline": baseline, "ratio": ratio, "target": target,
            "ok": check_target(ratio, target), "unit": unit, "note": note, **extra}


def _ratio(x, target: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if "%" in str(target):
        return f"{x * 100:.3g}%"
    return f"{x:.3f}"


def _with_unit(value, unit: str) -> str:
    text = fmt(value)
    return f"{text} {unit}" if unit and text not in ("-", "n/a") else text


def format_table(rows: list[dict]) -> str:
    header = ("metric", "ours", "baseline", "ratio", "target", "ok")
    body = []
    for r in rows:
        unit = r.get("unit") or ""
        ok = r.get("ok", check_target(r.get("ratio"), r.get("target", "")))
        body.append((r["metric"], _with_unit(r.get("ours"), unit),
                     _with_unit(r.get("baseline"), r.get("baseline_unit", unit)),
                     _ratio(r.get("ratio"), r.get("target", "")), str(r.get("target", "")),
                     {True: "yes", False: "MISSED", None: "-"}[ok]))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]

    def line(cells) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(b) for b in body]
    notes = [f"  {r['metric']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(out + (["", "notes:"] + notes if notes else []))


def write_json(path: str | Path, rows: list[dict], **meta) -> None:
    Path(path).write_text(json.dumps(strict_json({"rows": rows, **meta}), indent=1) + "\n")
