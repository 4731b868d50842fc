"""Train or resume a GPT run: `python train.py --config configs/tiny.toml [--section.field value ...]`,
or under torchrun. The same command starts a fresh run or resumes the newest checkpoint (resume = "auto").
"""
import sys

from gpt_simple import shutdown

shutdown.install()  # first thing: signals during imports and set-up request a graceful stop

from gpt_simple.cli import exit_now, train_main  # noqa: E402

if __name__ == "__main__":
    exit_now(train_main(sys.argv[1:]))
