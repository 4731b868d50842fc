"""`gpt-simple export`: consolidated safetensors + config, and a Hugging Face layout (GPT-2 or Llama).

It reads a DCP checkpoint in one process without torch.distributed and without unpickling anything but DCP's
allow-listed metadata (see gpt_simple.checkpoint.load_model_state); `gpt-simple generate` (generate.py) reads
checkpoints the same way. The weights are held once: each converted tensor is written and dropped in turn.

    gpt-simple export outputs/tiny/checkpoints/step-300-final exported/
    gpt-simple export outputs/tiny exported/            # a run directory: its newest committed checkpoint

OUT/ receives:
    gpt_simple.safetensors   every weight under its gpt-simple name (a tied head is stored once, as tok_emb)
    gpt_simple.json          {"model": ModelConfig fields, "step", "arch_hash", "tokenizer", "source", ...}
    config.json + model.safetensors   the Hugging Face layout (gpt_simple/hf.py): GPT2LMHeadModel for learned
                             positions + LayerNorm + GELU-tanh MLP, LlamaForCausalLM for RoPE + RMSNorm + SwiGLU
                             (GQA, bias terms as attention_bias / mlp_bias); other mixes have none. `--hf` makes it
                             required (else one line naming the setting, exit 2), `--no-hf` skips it.
    tokenizer.json (+ tokenizer_config.json ...) or README.md   the run's Hugging Face tokenizer, or what the ids
                             mean (byte-level, tiktoken)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from gpt_simple.checkpoint import (COMMITTED, META, CheckpointError, list_committed, load_model_state, meta_tokenizer,
                                   model_config_from_meta, read_meta, verify_checkpoint)
from gpt_simple import hf as hf_layout
from gpt_simple.config import ModelConfig
from gpt_simple.hf_io import write_safetensors
from gpt_simple.hf_tokenizer import WRITTEN, write_tokenizer
from gpt_simple.run_dir import RunDir

OURS_WEIGHTS, OURS_CONFIG = "gpt_simple.safetensors", "gpt_simple.json"
HF_WEIGHTS, HF_CONFIG = "model.safetensors", "config.json"
# FQN pieces that wrappers (activation checkpointing, torch.compile) may leave in parameter names.
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(ValueError):
    """A checkpoint that cannot be exported as asked; printed as one line, exit code 2."""


# -- finding and reading a checkpoint ---------------------------------------------------------------------
def resolve_checkpoint(path: str | Path) -> Path:
    """A committed checkpoint directory, or a run directory (→ its newest committed checkpoint)."""
    path = Path(path)
    if (path / COMMITTED).exists():
        return path
    for root in (RunDir(path).checkpoints, path):
        found = list_committed(root)
        if found:
            return found[-1].path
    if path.name.startswith(".tmp-") or (path / META).exists():
        raise ExportError(f"{path}: not a committed checkpoint (no {COMMITTED} marker: the save did not finish)")
    raise ExportError(f"{path}: no committed checkpoint here (expected a checkpoints/step-N directory or a run "
                      f"directory that has one)")


def load_checkpoint_model(path: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], ModelConfig, dict,
                                                                         Path]:
    """(state dict named like GPT.state_dict(), model config, meta.json, checkpoint dir) of a checkpoint. Its files
    are first checked against CHECKSUMS.json, as training's load checks them (verify=False skips that; a checkpoint
    saved before checksums existed is read unchecked): damaged weights must not leave as an export."""
    ckpt = resolve_checkpoint(path)
    if verify:
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as e:
            raise CheckpointError(f"{e}; the checkpoint is damaged (`gpt-simple verify {ckpt.parent}` says which "
                                  f"are intact: name one of them)") from None
    meta = read_meta(ckpt)
    cfg = model_config_from_meta(meta)
    state = {}
    for name, tensor in load_model_state(ckpt).items():
        for part in _WRAPPER_PARTS:
            name = name.replace(part, "")
        state[name] = tensor
    return state, cfg, meta, ckpt


def build_model(state: dict[str, torch.Tensor], cfg: ModelConfig, device: str | torch.device = "cpu"):
    from gpt_simple.model import GPT
    model = GPT(cfg)
    state = dict(state)
    if cfg.tie_embeddings:
        state.setdefault("head.weight", state["tok_emb.weight"])
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def tokenizer_spec(meta: dict, override: str | None = None) -> str:
    """The tokenizer the run trained with: recorded in meta, else read from the shards in data.dir."""
    if override:
        return override
    if meta_tokenizer(meta):
        return meta_tokenizer(meta)
    config = (meta.get("run") or {}).get("config") or {}
    data_dir = Path((config.get("data") or {}).get("dir", ""))
    if data_dir and data_dir.is_dir():
        from gpt_simple.data.shards import open_buckets
        try:
            return next(iter(open_buckets(data_dir).values())).tokenizer
        except Exception as e:  # noqa: BLE001 - reported with the remedy below
            raise ExportError(f"cannot read the tokenizer id from the shards in {data_dir} ({e}); "
                              f"pass --tokenizer SPEC") from None
    raise ExportError(f"the checkpoint does not record its tokenizer and data.dir {str(data_dir)!r} is not here; "
                      f"pass --tokenizer SPEC (e.g. 'byte' or 'tiktoken:gpt2')")


# -- export -----------------------------------------------------------------------------------------------
def export(checkpoint: str | Path, out: str | Path, hf: str = "auto", dtype: str = "float32",
           tokenizer: str | None = None, verify: bool = True) -> dict:
    """Write OUT/gpt_simple.{safetensors,json} and (hf = 'auto' when the architecture has a Hugging Face
    layout, 'yes' always) that layout, with the tokenizer.

    Returns a summary dict (paths, step, the layout written or why none)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder; give a folder to write the export into")
    state, cfg, meta, ckpt = load_checkpoint_model(checkpoint, verify)
    layout, why_not_hf = hf_layout.layout_of(cfg)
    if hf == "yes" and why_not_hf:
        raise ExportError(f"{ckpt}: cannot write a Hugging Face layout: {'; '.join(why_not_hf)}")
    try:
        spec = tokenizer_spec(meta, tokenizer)
    except ExportError:
        spec = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        summary = _write_ours(out, state, cfg, meta, ckpt, spec, dtype)
        summary.update(hf=False, hf_skipped=why_not_hf, layout=layout)
        if hf != "no" and not why_not_hf:
            summary["tokenizer_note"] = _write_hf(out, state, cfg, layout, meta, spec, tokenizer, dtype)
            summary["hf"] = True
        else:  # never leave an older export's HF files next to these weights: they would load a different model
            for name in (HF_WEIGHTS, HF_CONFIG, *WRITTEN):
                (out / name).unlink(missing_ok=True)
        return summary
    except OSError as e:
        raise ExportError(f"{out}: cannot write the export ({e})") from None


def _write_ours(out: Path, state, cfg: ModelConfig, meta: dict, ckpt: Path, spec, dtype: str) -> dict:
    names = [k for k in state if not (cfg.tie_embeddings and k == "head.weight")]
    info = {"step": meta.get("step"), "arch_hash": (meta.get("model") or {}).get("arch_hash"),
            "source": str(ckpt.resolve()), "tokenizer": spec, "dtype": dtype}
    write_safetensors(out / OURS_WEIGHTS, [(k, tuple(state[k].shape), lambda k=k: state[k]) for k in names],
                      DTYPES[dtype], metadata={"format": "pt", "gpt_simple": json.dumps(info)})
    (out / OURS_CONFIG).write_text(json.dumps({"model": dataclasses.asdict(cfg), **info}, indent=1) + "\n")
    return {"checkpoint": str(ckpt), "out": str(out), "step": meta.get("step"), "tensors": len(names),
            "parameters": sum(state[k].numel() for k in names)}


def _write_hf(out: Path, state, cfg: ModelConfig, layout: str, meta: dict, spec, override, dtype: str) -> str:
    note, eos = write_tokenizer(out, spec, meta, override, hf_layout.CLASSES[layout])
    write_safetensors(out / HF_WEIGHTS, hf_layout.export_tensors(state, cfg, layout, DTYPES[dtype]), DTYPES[dtype])
    config = hf_layout.hf_config(cfg, layout, eos)
    config["torch_dtype"] = config["dtype"] = dtype
    (out / HF_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    return note


def load_exported(out: str | Path, device: str | torch.device = "cpu"):
    """(GPT model, ModelConfig, info) from an export folder's gpt_simple.{safetensors,json}."""
    from safetensors.torch import load_file
    out = Path(out)
    info = json.loads((out / OURS_CONFIG).read_text())
    cfg = ModelConfig(**info["model"])
    return build_model(load_file(str(out / OURS_WEIGHTS)), cfg, device), cfg, info


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpt-simple export",
        description="Consolidate a (sharded DCP) checkpoint into one safetensors file + its model config; for "
                    "GPT-2 and Llama architectures also a Hugging Face folder (GPT2LMHeadModel, LlamaForCausalLM).")
    parser.add_argument("checkpoint", help="checkpoints/step-N directory, or a run directory (newest checkpoint)")
    parser.add_argument("out", help="output folder")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--hf", action="store_true", help="require the Hugging Face layout (error if impossible)")
    group.add_argument("--no-hf", action="store_true", help="skip the Hugging Face layout")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--tokenizer", help="tokenizer spec to record when the run's data.dir is not here; "
                        "hf:PATH/tokenizer.json also puts that file into the Hugging Face folder")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip checking the checkpoint's files against their recorded checksums")
    return parser


def export_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        s = export(args.checkpoint, args.out, "yes" if args.hf else "no" if args.no_hf else "auto", args.dtype,
                   args.tokenizer, args.verify)
    except (ExportError, CheckpointError, hf_layout.HFError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {s['checkpoint']} (step {s['step']}, {s['parameters']:,} parameters) to {s['out']}/"
          f"{OURS_WEIGHTS} + {OURS_CONFIG}")
    if s["hf"]:
        print(f"Hugging Face layout: {s['out']}/{HF_CONFIG} + {HF_WEIGHTS} "
              f"(transformers.{hf_layout.CLASSES[s['layout']]}.from_pretrained({s['out']!r})); {s['tokenizer_note']}")
    elif s["hf_skipped"]:
        print(f"no Hugging Face layout: {'; '.join(s['hf_skipped'])}")
    return 0
