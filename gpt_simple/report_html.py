"""The report as a picture (`gpt-simple report RUN_DIR --html FILE`): one self-contained HTML page with four
plots drawn by matplotlib (the optional `report` extra): training and validation loss against step and against
wall-clock time, each launch's span marked with how it ended; tokens/s per launch; and where each launch's time
went, with the lost work and the queue gaps.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from gpt_simple.run_dir import RunDir, read_jsonl

COLOURS = {"setup_s": "#9e9e9e", "train_s": "#2e7d32", "eval_s": "#1565c0", "save_s": "#ef6c00",
           "other_s": "#bdbdbd", "lost_s": "#c62828", "gap": "#eeeeee"}
LABELS = {"setup_s": "set-up", "train_s": "training", "eval_s": "evaluation", "save_s": "saves (blocking)",
          "other_s": "other", "lost_s": "lost (trained again)", "gap": "between launches"}


class MissingPlotting(RuntimeError):
    pass


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MissingPlotting("report --html needs matplotlib: pip install 'gpt-simple[report]' (the text report "
                              "works without it)") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _launch_of(t: float, rows: list[dict]) -> int | None:
    for r in rows:
        if r["start"] <= t <= r["end"] + 1.0:
            return r["launch"]
    return None


def _cause(ending: str) -> str:
    """A launch's ending, short: 'deadline', 'signal SIGTERM', 'completed', 'killed', 'transient failure'."""
    word, _, reason = ending.partition(": ")
    if word == "stopped" and reason:
        return reason.split(" (")[0]
    return word.split(" (")[0]


def write_html(path: Path, run_dir: Path, rows: list[dict], summary: dict) -> None:
    plt = _pyplot()
    records = read_jsonl(RunDir(run_dir).metrics)
    train = [r for r in records if "loss" in r and r.get("type") != "eval"]
    evals = [r for r in records if r.get("type") == "eval"]
    t0 = rows[0]["start"]
    figures = []

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(13, 4))
    by_step.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="training loss")
    by_step.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="validation loss")
    by_step.set(xlabel="step", ylabel="loss", title="loss against step")
    timed = [r for r in train if "time" in r]
    by_time.plot([(r["time"] - t0) / 60 for r in timed], [r["loss"] for r in timed], lw=1, label="training loss")
    timed_evals = [r for r in evals if "time" in r]
    by_time.plot([(r["time"] - t0) / 60 for r in timed_evals], [r["loss"] for r in timed_evals], "o-",
                 label="validation loss")
    for i, r in enumerate(rows):
        by_time.axvspan((r["start"] - t0) / 60, (r["end"] - t0) / 60, alpha=0.08 if i % 2 else 0.16,
                        color="tab:blue")
        by_time.annotate(f"{r['launch']}: {_cause(r['ending'])}", ((r["end"] - t0) / 60, 1.0),
                         xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right", fontsize=7)
    by_time.set(xlabel="wall-clock minutes since the first launch", ylabel="loss",
                title="loss against wall-clock time (shaded: each launch)")
    by_step.legend(fontsize=8)
    figures.append(("Loss", _png(fig)))
    plt.close(fig)

    fig, (speed, spent) = plt.subplots(1, 2, figsize=(13, 3.8))
    per_launch = {r["launch"]: [] for r in rows}
    for r in timed:
        n = _launch_of(r["time"], rows)
        if n is not None and r.get("tokens_per_s"):
            per_launch[n].append(r["tokens_per_s"])
    names = [str(n) for n in per_launch]
    medians = [sorted(v)[len(v) // 2] if v else 0 for v in per_launch.values()]
    speed.bar(names, medians, color="tab:green")
    speed.set(xlabel="launch", ylabel="tokens/s (median of its logged steps)", title="throughput per launch")

    left = 0.0
    for r in rows:
        if r["gap_before_s"]:
            spent.barh(0, r["gap_before_s"], left=left, color=COLOURS["gap"], edgecolor="white")
            left += r["gap_before_s"]
        for key in ("setup_s", "train_s", "eval_s", "save_s", "other_s"):
            width = r[key] - (r["lost_s"] if key == "train_s" else 0)
            spent.barh(0, width, left=left, color=COLOURS[key], edgecolor="white")
            left += width
            if key == "train_s" and r["lost_s"]:
                spent.barh(0, r["lost_s"], left=left, color=COLOURS["lost_s"], edgecolor="white")
                left += r["lost_s"]
        spent.annotate(str(r["launch"]), (left, 0.42), ha="right", fontsize=7)
    for key in ("setup_s", "train_s", "eval_s", "save_s", "other_s", "lost_s", "gap"):
        spent.barh(0, 0, color=COLOURS[key], label=LABELS[key])
    spent.set(yticks=[], xlabel="seconds since the first launch", title="where the time went")
    spent.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    figures.append(("Time", _png(fig)))
    plt.close(fig)

    from gpt_simple.report import format_text
    text = format_text(run_dir, rows, summary)
    body = "".join(f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" src="data:image/png;base64,'
                   f'{data}">' for title, data in figures)
    Path(path).write_text(f"<!doctype html><meta charset='utf-8'><title>gpt-simple report: {html.escape(str(run_dir))}"
                          f"</title><body style='font-family:sans-serif'><h1>{html.escape(str(run_dir))}</h1>"
                          f"<pre>{html.escape(text)}</pre>{body}</body>\n")
