"""Resume start-up benchmark: launch -> first step of a resumed run, against launch -> first step of a fresh run
plus the time the resumed run spent loading its checkpoint.

One short run of configs/bench.toml leaves a committed checkpoint (model + AdamW state); then fresh launches
(empty output_dir) and resumed launches (training.resume = "auto" finds the checkpoint) alternate. Each
launch is timed from Popen to the moment run_state.json says RUNNING / training (the loop starts its first
step) and killed there. The load time is the resumed launch's own, from its "resume" event (load_s), so the
ratio shows what resuming costs beyond reading the checkpoint: discovery, data cursor, config checks.

    python bench/resume.py [--quick | --smoke] [--json FILE]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cli import Mode, main_for  # noqa: E402
from bench.launch import TrainRun, scratch_dir  # noqa: E402
from bench.stats import median, spread  # noqa: E402
from bench.table import row  # noqa: E402

LONG = ["--training.max_steps", "1000", "--training.save_steps", "0"]


def startup(out: Path, mode: Mode, name: str) -> tuple[float, dict | None]:
    """(seconds from launch to the first step, the launch's resume event or None)."""
    run = TrainRun(out, [*LONG, *mode.overrides()], threads=mode.threads(), name=name).start()
    try:
        first = run.wait_running()
    finally:
        run.kill()
    resumed = [e for e in run.events() if e.get("event") == "resume" and e.get("launch") == (run.state() or {})
               .get("launches")]
    return first - run.launched_at, (resumed[-1] if resumed else None)


def run(mode: Mode = Mode()) -> list[dict]:
    root = scratch_dir("resume")
    saved = TrainRun(root / "resumed", ["--training.max_steps", "3", *mode.overrides()], threads=mode.threads(),
                     name="train.py (checkpoint)").start().finish()
    if not saved.state() or saved.state().get("status") != "COMPLETED":
        raise RuntimeError(f"could not make the checkpoint to resume from:\n{saved.log_tail()}")
    fresh, resumed, loads = [], [], []
    for i in range(mode.pick(3, 2, 1)):  # alternate, so a change in machine load hits both
        fresh.append(startup(root / f"fresh-{i}", mode, "train.py (fresh)")[0])
        seconds, event = startup(root / "resumed", mode, "train.py (resumed)")
        if event is None:
            raise RuntimeError("the resumed launch did not resume")
        resumed.append(seconds)
        loads.append(event["load_s"])
    baseline = [f + ld for f, ld in zip(fresh, loads)]
    return [row("resume start-up: launch -> first step", median(resumed), median(baseline),
                median([r / b for r, b in zip(resumed, baseline)]), "≤ 1.1x", unit="s",
                note=f"baseline = fresh launch {median(fresh):.2f}s + checkpoint load {median(loads):.2f}s "
                     f"({len(fresh)} pairs, resumed {spread(resumed, 's')})")]


if __name__ == "__main__":
    sys.exit(main_for(run, __doc__.splitlines()[0]))
