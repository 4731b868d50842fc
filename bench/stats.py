"""Statistics of a benchmark's samples: medians, spreads and whether a ratio meets its target.

Every benchmark here compares our figure with a baseline measured in the same run; these helpers summarise the
per-round samples of both (NaN and None samples, a round that could not be measured, are left out).
"""
from __future__ import annotations

import math
import re
import statistics


def clean(xs) -> list[float]:
    """The samples that are numbers (None and NaN dropped)."""
    return [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]


def median(xs) -> float:
    xs = clean(xs)
    return statistics.median(xs) if xs else float("nan")


def quartiles(xs) -> tuple[float, float]:
    """(first, third) quartile; both the median for fewer than 4 samples."""
    xs = sorted(clean(xs))
    if not xs:
        return float("nan"), float("nan")
    if len(xs) < 4:
        m = statistics.median(xs)
        return m, m
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def fmt(x) -> str:
    """A number for the table and the notes: 3-4 significant figures, thousands separated."""
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    a = abs(x)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.1f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.3g}"
    if a >= 1e-3:
        return f"{x:.4f}".rstrip("0")
    return f"{x:.2e}"


def spread(xs, unit: str = "") -> str:
    """'min..max unit (IQR q1..q3) over n' of a sample, for the notes."""
    xs = clean(xs)
    if not xs:
        return "no samples"
    text = f"{fmt(min(xs))}..{fmt(max(xs))}" + (f" {unit}" if unit else "")
    if len(xs) >= 4:
        q1, q3 = quartiles(xs)
        text += f" (IQR {fmt(q1)}..{fmt(q3)})"
    return f"{text} over {len(xs)}"


def check_target(ratio, target: str):
    """True/False for '≥ 0.95', '<= 1%', '≤ 1.2x'; None for 'report', 'skipped' or a ratio that is not a number."""
    if ratio is None or (isinstance(ratio, float) and math.isnan(ratio)):
        return None
    m = re.match(r"\s*(>=|≥|<=|≤|>|<)\s*([0-9.]+)\s*(%|x|×)?\s*$", str(target))
    if not m:
        return None
    op, value, unit = m.groups()
    bound = float(value) / (100.0 if unit == "%" else 1.0)
    return ratio >= bound if op in (">=", "≥", ">") else ratio <= bound
