"""`gpt-simple train | status | stop | prepare | validate | verify | eval | export | generate | report` (and the
flat train.py / status.py scripts)."""
from __future__ import annotations

import argparse
import atexit
import os
import sys
from typing import NoReturn

from gpt_simple import shutdown

USAGE = """usage: gpt-simple COMMAND [...]

commands:
  train     --config FILE [--section.field value ...]   train (or resume) a run
  status    --output-dir DIR [--json]                   print the run's status (first line: the word)
  stop      DIR                                         ask a running job to save and exit
  prepare   INPUT... --out DIR --bucket NAME | --demo DIR   tokenize text into shards
  validate  --config FILE [overrides]                   check config and data demand without training
  verify    OUTDIR | CHECKPOINT                         check checkpoints' checksums and digest chain
            RUN_DIR --replay K [--from step-N] [--tol T]   retrain K steps from a checkpoint, compare with the run
  eval      CHECKPOINT_OR_OUTPUT_DIR [--tokens N] [--json]   validation loss of a committed checkpoint
  export    CHECKPOINT OUT [--hf]                       consolidated safetensors weights + model config
  generate  --output-dir DIR | --checkpoint PATH        sample text from the newest checkpoint
  report    RUN_DIR [--json] [--html FILE]             where the run's time went, launch by launch: goodput
"""


class AliasArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose abbreviations see an option and its spelling alias (`--max-new-tokens`,
    `--max_new_tokens`) as one option: `--max 5` still means it, as before the alias existed."""

    def _get_option_tuples(self, option_string):
        seen, unique = set(), []
        for option_tuple in super()._get_option_tuples(option_string):
            if option_tuple[0] not in seen:  # the action
                seen.add(option_tuple[0])
                unique.append(option_tuple)
        return unique


def build_train_parser() -> argparse.ArgumentParser:
    """`gpt-simple train` (and `validate`): the options; everything else is a `--section.field value` override."""
    parser = argparse.ArgumentParser(prog="gpt-simple train", description="Train or resume a GPT run.")
    parser.add_argument("--config", help="TOML config file (defaults apply where omitted)")
    parser.add_argument("--force", action="store_true", help="with training.resume = 'scratch': delete the run")
    parser.add_argument("--dry-run", action="store_true", help="validate config and data demand, then exit")
    return parser


def train_main(argv: list[str]) -> int:
    shutdown.install()  # before any heavy import: a signal during set-up is honoured
    args, overrides = build_train_parser().parse_known_args(argv)
    from gpt_simple.config import ConfigError, load_config
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        from gpt_simple.preflight import validate_main
        return validate_main(cfg)
    from gpt_simple.launch import run
    return run(cfg, force=args.force)


def validate_cmd(argv: list[str]) -> int:
    return train_main(["--dry-run", *argv])


def status_cmd(argv: list[str]) -> int:
    from gpt_simple.status_report import status_main
    return status_main(argv)


def build_stop_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt-simple stop", description="Ask a running job to save and exit 0.")
    parser.add_argument("output_dir")
    return parser


def stop_cmd(argv: list[str]) -> int:
    args = build_stop_parser().parse_args(argv)
    path = shutdown.request_stop(args.output_dir)
    print(f"stop requested: {path} (the job saves and exits at its next step)")
    return 0


def prepare_cmd(argv: list[str]) -> int:
    from gpt_simple.data.prepare import prepare_main
    return prepare_main(argv)


def verify_cmd(argv: list[str]) -> int:
    from gpt_simple.checkpoint.verify import verify_main

    def replay(args) -> int:  # trains: imported only for --replay (the check alone stays light)
        shutdown.install()
        from gpt_simple.replay import replay_main
        return replay_main(args)
    return verify_main(argv, replay=replay)


def export_cmd(argv: list[str]) -> int:
    from gpt_simple.export import export_main
    return export_main(argv)


def eval_cmd(argv: list[str]) -> int:
    from gpt_simple.eval_cli import eval_main
    return eval_main(argv)


def report_cmd(argv: list[str]) -> int:
    from gpt_simple.report import report_main
    return report_main(argv)


def generate_cmd(argv: list[str]) -> int:
    from gpt_simple.generate import generate_main
    return generate_main(argv)


COMMANDS = {"train": train_main, "status": status_cmd, "stop": stop_cmd, "prepare": prepare_cmd,
            "validate": validate_cmd, "verify": verify_cmd, "eval": eval_cmd, "export": export_cmd,
            "generate": generate_cmd, "report": report_cmd}


def exit_now(code: int) -> NoReturn:
    """End the process with `code` without the interpreter's teardown. A command has closed what it opened by
    the time it returns (the journal's files, the checkpoint manager's threads, the process group); what is
    left is garbage-collecting torch's modules: 0.7 s after `import torch` alone on the 2-core CPU, a second
    after a training launch, paid by every launch and every rank. The atexit handlers (logging, W&B) still
    run, and the console is flushed."""
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can reach it anyway
                pass
        os._exit(code)


def entry() -> NoReturn:
    """The `gpt-simple` console command."""
    exit_now(main())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    entry()
