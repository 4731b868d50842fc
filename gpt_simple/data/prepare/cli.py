"""`gpt-simple prepare`: the command line over prepare() and prepare_demo(), and its exit codes."""
from __future__ import annotations

import argparse
import sys

from gpt_simple.data.prepare.build import prepare
from gpt_simple.data.prepare.demo import DEMO_BUCKETS, DEMO_DEFAULT, prepare_demo
from gpt_simple.data.prepare.errors import PrepareError
from gpt_simple.data.prepare.sources import format_list
from gpt_simple.data.prepare.writer import SHARD_TOKENS
from gpt_simple.data.shards import ShardError

DESCRIPTION = ("`gpt-simple prepare`: text / JSONL / Parquet / the embedded demo corpus → token shards of one "
               "named bucket.")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise PrepareError(f"{message} (see gpt-simple prepare --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gpt-simple prepare", description=DESCRIPTION,
                epilog="Exit codes: 0 done (malformed records skipped are listed as warnings), 1 an I/O error, "
                       "2 bad arguments or input (with --strict: the first malformed record), 130 interrupted.")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help=f"{format_list(', ')} files or folders of them")
    p.add_argument("--out", help="data folder (data.dir); the bucket goes to OUT/BUCKET")
    p.add_argument("--bucket", help="bucket name (a sub-folder of OUT)")
    p.add_argument("--tokenizer", default="byte", help="byte (default), tiktoken:NAME or hf:FILE.json")
    p.add_argument("--field", default="text", help="JSONL field holding the document text (default: text)")
    p.add_argument("--text-column", default="text", help="Parquet column holding the document text (default: text)")
    p.add_argument("--strict", action="store_true", help="stop at the first malformed record (default: skip it)")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (default: one per CPU)")
    p.add_argument("--force", action="store_true", help="replace the bucket if it exists")
    p.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS,
                   help=f"start a new shard after this many tokens (default: {SHARD_TOKENS:,})")
    p.add_argument("--val-docs", type=int, default=0, metavar="N",
                   help="set aside N whole documents (a seeded random sample) as the bucket's validation split "
                        "(BUCKET/val); they are not in the training shards (default: 0, no split)")
    p.add_argument("--val-seed", type=int, default=0, help="seed of the --val-docs sample (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress line and no per-record warnings")
    p.add_argument("--demo", metavar="OUT", help="build the embedded demo corpus (Python's stdlib) into OUT")
    p.add_argument("--buckets", default=",".join(DEMO_DEFAULT),
                   help=f"with --demo: which demo buckets (of {', '.join(DEMO_BUCKETS)}; default "
                        f"{','.join(DEMO_DEFAULT)})")
    return p


def prepare_main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.workers < 0:
            raise PrepareError("--workers must be >= 0")
        if args.shard_tokens < 1:
            raise PrepareError("--shard-tokens must be >= 1")
        if args.val_docs < 0:
            raise PrepareError("--val-docs must be >= 0")
        if args.demo:
            if args.inputs or args.out or args.bucket:
                raise PrepareError("--demo OUT builds the demo corpus; give no INPUT, --out or --bucket with it")
            buckets = [b.strip() for b in args.buckets.split(",") if b.strip()]
            for summary in prepare_demo(args.demo, buckets, args.workers, args.quiet, args.force).values():
                print(summary.line())
            return 0
        if not args.inputs or not args.out or not args.bucket:
            raise PrepareError("give INPUT... --out DIR --bucket NAME (or --demo DIR)")
        summary = prepare(args.inputs, args.out, args.bucket, args.tokenizer, args.workers, args.strict,
                          args.quiet, args.field, args.force, args.shard_tokens, text_column=args.text_column,
                          val_docs=args.val_docs, val_seed=args.val_seed)
        print(summary.line())
        return 0
    except (PrepareError, ShardError, ValueError) as e:  # ValueError: a bad tokenizer spec
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        kept = getattr(e, "kept", None)
        print(f"error: interrupted; the finished shards are kept in {kept}: run the same command again to "
              f"continue" if kept else "error: interrupted; nothing was written", file=sys.stderr)
        return 130
