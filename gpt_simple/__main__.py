from gpt_simple.cli import entry

entry()
