"""`gpt-simple prepare`: text / JSONL / Parquet / the embedded demo corpus → token shards of one named bucket.

    gpt-simple prepare INPUT... --out DATA --bucket NAME [--tokenizer byte|tiktoken:NAME|hf:FILE.json]
                                [--strict] [--workers N] [--field text] [--text-column text] [--force]
    gpt-simple prepare --demo DATA [--buckets code,prose,comments] [--force]

    sources.py     finding the input files; cutting each into tasks (compressed.py: .jsonl.gz / .jsonl.zst,
                   parquet.py: Parquet)
    tasks.py       the task variants, and what a worker does with each: parse, tokenize
    pool.py        the worker processes; results in input order, a bounded number in flight
    build.py       the pipeline, and where a killed build continues
    writer.py      a bucket's shards, published by one rename; folder.py: the build folder and its records
    report.py      progress, warnings, the summary line
    demo.py        the embedded demo corpus
    cli.py         the command line

docs/data.md describes the behaviour.
"""
from gpt_simple.data.prepare.build import prepare, write_bucket
from gpt_simple.data.prepare.cli import prepare_main
from gpt_simple.data.prepare.demo import DEMO_BUCKETS, DEMO_DEFAULT, ensure_demo, prepare_demo, stdlib_sources
from gpt_simple.data.prepare.errors import PrepareError
from gpt_simple.data.prepare.pool import default_workers
from gpt_simple.data.prepare.report import Summary
from gpt_simple.data.prepare.sources import CHUNK_BYTES, file_tasks, input_files
from gpt_simple.data.prepare.writer import SHARD_TOKENS, BucketWriter

__all__ = ["BucketWriter", "CHUNK_BYTES", "DEMO_BUCKETS", "DEMO_DEFAULT", "PrepareError", "SHARD_TOKENS",
           "Summary", "default_workers", "ensure_demo", "file_tasks", "input_files", "prepare", "prepare_demo",
           "prepare_main", "stdlib_sources", "write_bucket"]
