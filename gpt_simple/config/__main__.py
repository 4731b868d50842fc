"""`python -m gpt_simple.config --markdown > docs/configuration.md`: the generated configuration reference."""
import sys

from gpt_simple.config.parse import markdown_reference

if sys.argv[1:] == ["--markdown"]:
    print(markdown_reference(), end="")
else:
    print("usage: python -m gpt_simple.config --markdown", file=sys.stderr)
    sys.exit(2)
