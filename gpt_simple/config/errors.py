"""The config's one error type and its did-you-mean hint (shared by the schema checks and the parser)."""
from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """A user mistake in the config or the command line; printed as one line, exit code 2."""


def suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
