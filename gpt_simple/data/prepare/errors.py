"""The one exception of `gpt-simple prepare`, and the one-line error for an optional library that is missing."""
from __future__ import annotations

import importlib
from pathlib import Path


class PrepareError(ValueError):
    """Malformed input in strict mode, or input that cannot be used at all: one line for the user."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a build; `kept` names the build folder when it holds finished shards for a rerun."""

    def __init__(self, kept: Path | None):
        super().__init__()
        self.kept = kept


def optional(module: str, extra: str, purpose: str):
    """Import a library that only some inputs need; its absence is one line that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise PrepareError(f"{purpose} needs {package}: pip install 'gpt-simple[{extra}]' "
                           f"(or pip install {package})") from None
