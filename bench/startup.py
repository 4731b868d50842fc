"""Start-up of a resumed launch, phase by phase, against the time of one training step.

A run trains one step and saves; a second launch resumes it and trains three more (log_steps 1). The second
launch's `setup` event (events.jsonl: the clock's marks, gpt_simple/clock.py) says where its set-up went:
imports (the interpreter, torch, the package), the process group, the run folder (lease, journal), the model
(built, sharded, its optimizer), the data (stream, held-out split), the checkpoint (load and verification, the
carried figures), other. Its first step is timed apart from the later ones (lazy initialisation, a compile).
Each figure is divided by the median of its later steps: "this phase costs k steps".

    python bench/startup.py [--quick | --smoke] [--json PATH]

Two models: the tiny one (configs/tiny.toml) and GPT-2 124M (configs/gpt2.toml, on the demo corpus, a
micro-batch of 2 x 256 tokens so that a CPU step takes seconds, not minutes); --smoke runs the smoke model only.
And the compile cache: the tiny model with training.compile, the first launch's compile (from nothing) against
the resumed launch's (the run's compile_cache/ from the first), target <= 0.2.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cli import SMOKE_MODEL, Mode, main_for  # noqa: E402
from bench.launch import ROOT, TrainRun, scratch_dir  # noqa: E402
from bench.stats import median  # noqa: E402
from bench.table import row  # noqa: E402

from gpt_simple.journal import events  # noqa: E402

DEMO = ["--data.dir", "data/demo", "--data.demo", "true"]
QUIET = ["--training.save_steps", "0", "--training.log_steps", "1", "--eval.every_steps", "0",
         "--eval.at_end", "false", "--training.tensorboard", "false", "--optimizer.warmup_steps", "0"]
MODELS = {
    "tiny": (ROOT / "configs" / "tiny.toml", []),
    "GPT-2 124M": (ROOT / "configs" / "gpt2.toml",
                   [*DEMO, "--data.seq_len", "256", "--training.global_batch_size", "2",
                    "--training.micro_batch_size", "2", "--training.device", "cpu", "--training.dtype", "fp32",
                    "--training.compile", "false"]),
}
PHASES = ("imports", "process_group", "run_folder", "model", "data", "checkpoint", "other")


def resumed_launch(name: str, config: Path, overrides: list[str], mode: Mode) -> dict:
    """Train one step and save; resume and train three more. The resumed launch's phases and step times."""
    out = scratch_dir("startup") / "run"
    for steps in (1, 4):
        run = TrainRun(out, [*overrides, *QUIET, "--training.max_steps", str(steps)], config=config,
                       threads=mode.threads(), name=f"train.py ({name}, to step {steps})").start().finish()
        if (run.state() or {}).get("status") != "COMPLETED":
            raise RuntimeError(f"the {name} run did not complete:\n{run.log_tail()}")
    setups = [e for e in run.events() if e.get("event") == events.Setup.kind]
    resumes = [e for e in run.events() if e.get("event") == events.Resume.kind]
    if len(setups) != 2 or not resumes:
        raise RuntimeError(f"expected two launches, the second resumed: {setups} {resumes}")
    records = sorted(run.metrics(), key=lambda r: r["step"])
    # each record's window is its one step (log_steps 1); "tokens" is the run's running count
    steps = {r["step"]: (r["tokens"] - (prev["tokens"] if prev else 0)) / r["tokens_per_s"]
             for prev, r in zip([None, *records], records)}
    return {"setup": setups[-1], "first_step_s": steps[2], "step_s": median([steps[3], steps[4]]),
            "load_s": resumes[-1]["load_s"], "fresh_first_step_s": steps[1]}


def rows_for(name: str, got: dict) -> list[dict]:
    step, setup = got["step_s"], got["setup"]
    phases = setup["phases"]
    out = [row(f"start-up, resumed launch ({name}): set-up in all, in steps", setup["setup_s"], step,
               setup["setup_s"] / step, "report", unit="s",
               note=f"process start -> first step, over the median of steps 3-4 ({step:.3f}s); the checkpoint "
                    f"load alone {got['load_s']:.2f}s")]
    for phase in PHASES:
        if phase in phases:
            out.append(row(f"{name}: {phase.replace('_', ' ')}", phases[phase], step, phases[phase] / step,
                           "report", unit="s"))
    extra = got["first_step_s"] - step
    out.append(row(f"{name}: the first step's extra (lazy initialisation, compile)", extra, step, extra / step,
                   "report", unit="s", note=f"first step {got['first_step_s']:.3f}s"))
    return out


def compile_row(name: str, got: dict) -> dict:
    """training.compile: the first launch compiles from nothing, the resumed one finds the run's compile cache
    (training.compile_cache_dir = 'auto'). Each first step's extra over a later step is its compile."""
    step = got["step_s"]
    cold, warm = got["fresh_first_step_s"] - step, got["first_step_s"] - step
    return row(f"{name}, compiled: the resumed launch's compile (cache hit) vs the first launch's", warm, cold,
               warm / cold if cold > 0 else None, "≤ 0.2", unit="s",
               note=f"first step minus a later step ({step:.3f}s): first launch {got['fresh_first_step_s']:.2f}s, "
                    f"resumed launch {got['first_step_s']:.2f}s; its set-up {got['setup']['setup_s']:.2f}s")


def run(mode: Mode = Mode()) -> list[dict]:
    models = {"smoke": (ROOT / "configs" / "tiny.toml", SMOKE_MODEL)} if mode.smoke else MODELS
    rows = []
    for name, (config, overrides) in models.items():
        rows += rows_for(name, resumed_launch(name, config, [*overrides, *mode.data()], mode))
    if not mode.smoke:  # a cold compile takes half a minute even of the tiny model on a CPU
        tiny = ROOT / "configs" / "tiny.toml"
        rows.append(compile_row("tiny", resumed_launch("tiny, compiled", tiny,
                                                       ["--training.compile", "true", *mode.data()], mode)))
    return rows


if __name__ == "__main__":
    sys.exit(main_for(run, __doc__.splitlines()[0]))
