"""Where the repository is, and the interpreter the tests run under (and their children too)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
