"""Print a run's status: `python status.py OUTDIR [--json]`. First line: the status word alone."""
import sys

from gpt_simple.status_report import status_main

if __name__ == "__main__":
    sys.exit(status_main(sys.argv[1:]))
