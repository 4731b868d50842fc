"""`gpt-simple generate`: sample text from a checkpoint with GPT.generate.

    gpt-simple generate --output-dir outputs/tiny --prompt "def " --max-new-tokens 200

The checkpoint is read in one process without torch.distributed (gpt_simple.export.load_checkpoint_model), and
the tokenizer is the one the run trained with (recorded in the checkpoint, else read from its data.dir shards).
"""
from __future__ import annotations

import argparse
import sys

import torch

from gpt_simple.checkpoint import CheckpointError
from gpt_simple.cli import AliasArgumentParser
from gpt_simple.export import ExportError, build_model, load_checkpoint_model, tokenizer_spec


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ExportError(f"--device {name!r}: not a device (cpu, cuda, cuda:1, mps, ...)") from None
    available = {"cpu": lambda: True, "cuda": torch.cuda.is_available,
                 "mps": lambda: torch.backends.mps.is_available()}.get(device.type, lambda: False)
    if not available() or (device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count()):
        raise ExportError(f"--device {name!r}: not available on this machine")
    return device


def build_parser() -> argparse.ArgumentParser:
    parser = AliasArgumentParser(prog="gpt-simple generate", description="Sample text from a checkpoint.")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--output-dir", "--output_dir", help="run directory: use its newest committed checkpoint")
    where.add_argument("--checkpoint", help="a checkpoints/step-N directory")
    parser.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    parser.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", "--top_k", type=int, default=50, help="0 = no top-k filtering")
    parser.add_argument("--num-samples", "--num_samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--tokenizer", help="tokenizer spec, if the run's data.dir is not available here")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip checking the checkpoint's files against their recorded checksums")
    return parser


def generate_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = _device(args.device)
        state, cfg, meta, ckpt = load_checkpoint_model(args.output_dir or args.checkpoint, args.verify)
        from gpt_simple.data.tokenizer import get_tokenizer
        try:
            tok = get_tokenizer(tokenizer_spec(meta, args.tokenizer))
        except ValueError as e:
            raise ExportError(str(e)) from None
    except (ExportError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = build_model(state, cfg, device)
    # An empty prompt starts a new document: the end-of-document token is what precedes every document.
    prompt = [int(t) for t in tok.encode(args.prompt)] if args.prompt else [tok.eos]
    prompt = prompt[-cfg.block_size:]
    print(f"# {ckpt} (step {meta.get('step')}), tokenizer {tok.id}, seed {args.seed}", file=sys.stderr)
    generator = torch.Generator().manual_seed(args.seed)
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    for i in range(args.num_samples):
        tokens = model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, generator,
                                stop=tok.eos)[0, len(prompt):].tolist()
        if tok.eos in tokens:  # the end of the document: not part of the text
            tokens = tokens[:tokens.index(tok.eos)]
        if i:
            print("\n" + "-" * 40)
        print(args.prompt + tok.decode(tokens), flush=True)
    return 0
