"""Command options have one spelling: in every subcommand's parser, each underscore long option (`--max_new_tokens`)
has a hyphenated alias (`--max-new-tokens`), shown first in help and usage, that parses to the same dest. (`train`'s
`--section.field` overrides are config field names, not options of its parser.)"""
import argparse

import pytest

import gpt_simple.data.prepare.cli as prepare_cli
from gpt_simple import cli, eval_cli, export, generate, report, status_report


class _Captured(Exception):
    pass


def _verify_parser(monkeypatch) -> argparse.ArgumentParser:
    """`gpt-simple verify` builds its parser inside verify_main: take it at its parse_args call."""
    from gpt_simple.checkpoint import verify

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Captured) as caught:
        verify.verify_main([])
    return caught.value.args[0]


PARSERS = {
    "train": lambda mp: cli.build_train_parser(),
    "validate": lambda mp: cli.build_train_parser(),  # `validate` is `train --dry-run`
    "status": lambda mp: status_report.build_parser(),
    "stop": lambda mp: cli.build_stop_parser(),
    "prepare": lambda mp: prepare_cli.build_parser(),
    "verify": _verify_parser,
    "eval": lambda mp: eval_cli.build_parser(),
    "export": lambda mp: export.build_parser(),
    "generate": lambda mp: generate.build_parser(),
    "report": lambda mp: report.build_parser(),
}


def test_every_command_is_checked():
    assert set(PARSERS) == set(cli.COMMANDS)


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_underscore_options_have_a_hyphenated_alias(command, monkeypatch):
    parser = PARSERS[command](monkeypatch)
    for action in parser._actions:
        for option in action.option_strings:
            if not option.startswith("--") or "_" not in option:
                continue
            hyphenated = option.replace("_", "-")
            assert hyphenated in action.option_strings, f"{command}: {option} has no alias {hyphenated}"
            assert parser._option_string_actions[hyphenated].dest == parser._option_string_actions[option].dest
            assert "_" not in action.option_strings[0], f"{command}: help and usage show {action.option_strings[0]}"


@pytest.mark.parametrize("spelling", ["hyphen", "underscore"])
def test_generate_parses_both_spellings_to_the_same_dests(spelling):
    def opt(name):
        return "--" + (name.replace("_", "-") if spelling == "hyphen" else name)
    args = generate.build_parser().parse_args([opt("output_dir"), "runs/a", opt("max_new_tokens"), "7",
                                               opt("top_k"), "3", opt("num_samples"), "2"])
    assert (args.output_dir, args.max_new_tokens, args.top_k, args.num_samples) == ("runs/a", 7, 3, 2)


def test_generate_abbreviations_still_name_one_option():
    args = generate.build_parser().parse_args(["--output", "runs/a", "--max", "5", "--top", "0", "--num", "4"])
    assert (args.output_dir, args.max_new_tokens, args.top_k, args.num_samples) == ("runs/a", 5, 0, 4)


@pytest.mark.parametrize("option", ["--output-dir", "--output_dir"])
def test_status_parses_both_spellings(option):
    assert status_report.build_parser().parse_args([option, "runs/a"]).output_dir == "runs/a"


def test_a_command_ends_without_teardown_but_with_its_exit_code_atexit_handlers_and_output():
    """exit_now (the end of train.py and of the `gpt-simple` entry) skips the interpreter's teardown, not what a
    process owes on the way out: the code, the atexit handlers (logging, W&B), buffered console output."""
    import subprocess
    import sys
    code = ("import atexit, sys\nfrom gpt_simple.cli import exit_now\n"
            "atexit.register(lambda: print('handler ran'))\n"
            "sys.stdout.write('buffered, no newline; ')\nsys.stderr.write('to stderr')\nexit_now(3)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert proc.stdout == "buffered, no newline; handler ran\n" and proc.stderr == "to stderr"
