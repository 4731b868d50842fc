import sys

from gpt_simple.cli import main

sys.exit(main())
