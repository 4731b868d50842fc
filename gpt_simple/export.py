"""`gpt-simple export`: consolidated safetensors + config, and a Hugging Face GPT-2 layout.

It reads a DCP checkpoint in one process without torch.distributed and without unpickling anything but DCP's
allow-listed metadata (see gpt_simple.checkpoint.load_model_state); `gpt-simple generate` (generate.py) reads
checkpoints the same way.

    gpt-simple export outputs/tiny/checkpoints/step-300-final exported/
    gpt-simple export outputs/tiny exported/            # a run directory: its newest committed checkpoint

OUT/ receives:
    gpt_simple.safetensors   every weight under its gpt-simple name (a tied head is stored once, as tok_emb)
    gpt_simple.json          {"model": ModelConfig fields, "step", "arch_hash", "tokenizer", "source", ...}
    config.json + model.safetensors   the Hugging Face GPT2LMHeadModel layout, when the architecture is GPT-2's
                             (learned positions, LayerNorm, GELU-tanh MLP, no GQA); `--hf` makes it required,
                             `--no-hf` skips it. Load with transformers.GPT2LMHeadModel.from_pretrained(OUT).
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
from gpt_simple.config import ModelConfig
from gpt_simple.run_dir import RunDir

OURS_WEIGHTS, OURS_CONFIG = "gpt_simple.safetensors", "gpt_simple.json"
HF_WEIGHTS, HF_CONFIG = "model.safetensors", "config.json"
# FQN pieces that wrappers (activation checkpointing, torch.compile) may leave in parameter names.
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


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


# -- the Hugging Face GPT-2 layout ------------------------------------------------------------------------
def hf_incompatibility(cfg: ModelConfig) -> list[str]:
    """Why GPT2LMHeadModel cannot hold this architecture (empty when it can)."""
    why = []
    if cfg.pos_embedding != "learned":
        why.append(f"model.pos_embedding = {cfg.pos_embedding!r} (GPT-2 has learned positions)")
    if cfg.norm != "layernorm":
        why.append(f"model.norm = {cfg.norm!r} (GPT-2 uses LayerNorm)")
    if cfg.mlp != "gelu":
        why.append(f"model.mlp = {cfg.mlp!r} (GPT-2 uses a GELU MLP)")
    if cfg.n_kv_head not in (0, cfg.n_head):
        why.append(f"model.n_kv_head = {cfg.n_kv_head} (GPT-2 has no grouped-query attention)")
    return why


def hf_config(cfg: ModelConfig, eos: int | None = None) -> dict:
    hidden = int(cfg.mlp_ratio * cfg.n_embd)
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": hidden,
        "activation_function": "gelu_new",  # our MLP uses the tanh approximation of GELU
        "layer_norm_epsilon": cfg.norm_eps, "initializer_range": 0.02,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True,
        "dtype": "float32", "torch_dtype": "float32",
    }
    if eos is not None:
        config.update(bos_token_id=eos, eos_token_id=eos)
    return config


def to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """gpt-simple names → GPT2LMHeadModel names. HF's Conv1D stores weights as (in, out): transposed.
    Missing biases (model.bias = false) are written as zeros, which computes the same function."""
    def bias(name: str, size: int) -> torch.Tensor:
        return state[name] if name in state else torch.zeros(size, dtype=state["tok_emb.weight"].dtype)

    hidden = state["blocks.0.mlp.up.weight"].shape[0] if cfg.n_layer else int(cfg.mlp_ratio * cfg.n_embd)
    C = cfg.n_embd
    out = {"transformer.wte.weight": state["tok_emb.weight"], "transformer.wpe.weight": state["pos_emb.weight"],
           "transformer.ln_f.weight": state["norm.weight"], "transformer.ln_f.bias": bias("norm.bias", C)}
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        out.update({
            h + "ln_1.weight": state[b + "norm1.weight"], h + "ln_1.bias": bias(b + "norm1.bias", C),
            h + "attn.c_attn.weight": state[b + "attn.qkv.weight"].t(),
            h + "attn.c_attn.bias": bias(b + "attn.qkv.bias", 3 * C),
            h + "attn.c_proj.weight": state[b + "attn.proj.weight"].t(),
            h + "attn.c_proj.bias": bias(b + "attn.proj.bias", C),
            h + "ln_2.weight": state[b + "norm2.weight"], h + "ln_2.bias": bias(b + "norm2.bias", C),
            h + "mlp.c_fc.weight": state[b + "mlp.up.weight"].t(), h + "mlp.c_fc.bias": bias(b + "mlp.up.bias", hidden),
            h + "mlp.c_proj.weight": state[b + "mlp.down.weight"].t(),
            h + "mlp.c_proj.bias": bias(b + "mlp.down.bias", C),
        })
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


# -- export -----------------------------------------------------------------------------------------------
def export(checkpoint: str | Path, out: str | Path, hf: str = "auto", dtype: str = "float32",
           tokenizer: str | None = None, verify: bool = True) -> dict:
    """Write OUT/gpt_simple.{safetensors,json} and (hf = 'auto' when compatible, 'yes' always) the HF layout.

    Returns a summary dict (paths, step, whether the HF layout was written and why not)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder; give a folder to write the export into")
    state, cfg, meta, ckpt = load_checkpoint_model(checkpoint, verify)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    state = {k: v.to(dt) for k, v in state.items()}
    why_not_hf = hf_incompatibility(cfg)
    if hf == "yes" and why_not_hf:
        raise ExportError(f"{ckpt}: cannot write the Hugging Face GPT-2 layout: {'; '.join(why_not_hf)}")
    try:
        spec = tokenizer_spec(meta, tokenizer)
    except ExportError:
        spec = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        return _write_export(out, state, cfg, meta, ckpt, spec, dtype, hf, why_not_hf, save_file)
    except OSError as e:
        raise ExportError(f"{out}: cannot write the export ({e})") from None


def _write_export(out: Path, state, cfg: ModelConfig, meta: dict, ckpt: Path, spec, dtype: str, hf: str,
                  why_not_hf: list[str], save_file) -> dict:
    ours = {k: v.contiguous() for k, v in state.items() if not (cfg.tie_embeddings and k == "head.weight")}
    info = {"step": meta.get("step"), "arch_hash": (meta.get("model") or {}).get("arch_hash"),
            "source": str(ckpt.resolve()), "tokenizer": spec, "dtype": dtype}
    save_file(ours, str(out / OURS_WEIGHTS), metadata={"format": "pt", "gpt_simple": json.dumps(info)})
    (out / OURS_CONFIG).write_text(json.dumps({"model": dataclasses.asdict(cfg), **info}, indent=1) + "\n")
    summary = {"checkpoint": str(ckpt), "out": str(out), "step": meta.get("step"), "tensors": len(ours),
               "parameters": sum(v.numel() for v in ours.values()), "hf": False, "hf_skipped": why_not_hf}
    if hf != "no" and not why_not_hf:
        eos = None
        if spec:
            try:
                from gpt_simple.data.tokenizer import get_tokenizer
                eos = get_tokenizer(spec).eos
            except ValueError:
                eos = None
        save_file(to_hf_state(state, cfg), str(out / HF_WEIGHTS), metadata={"format": "pt"})
        config = hf_config(cfg, eos)
        config["torch_dtype"] = config["dtype"] = dtype
        (out / HF_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
        summary["hf"] = True
    else:  # never leave an older export's HF files next to these weights: they would load a different model
        for name in (HF_WEIGHTS, HF_CONFIG):
            (out / name).unlink(missing_ok=True)
    return summary


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
        description="Consolidate a (sharded DCP) checkpoint into one safetensors file + its model config; "
                    "for GPT-2 architectures also a Hugging Face GPT2LMHeadModel folder.")
    parser.add_argument("checkpoint", help="checkpoints/step-N directory, or a run directory (newest checkpoint)")
    parser.add_argument("out", help="output folder")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--hf", action="store_true", help="require the Hugging Face layout (error if impossible)")
    group.add_argument("--no-hf", action="store_true", help="skip the Hugging Face layout")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--tokenizer", help="tokenizer spec to record when the run's data.dir is not here")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip checking the checkpoint's files against their recorded checksums")
    return parser


def export_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        s = export(args.checkpoint, args.out, "yes" if args.hf else "no" if args.no_hf else "auto", args.dtype,
                   args.tokenizer, args.verify)
    except (ExportError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {s['checkpoint']} (step {s['step']}, {s['parameters']:,} parameters) to {s['out']}/"
          f"{OURS_WEIGHTS} + {OURS_CONFIG}")
    if s["hf"]:
        print(f"Hugging Face layout: {s['out']}/{HF_CONFIG} + {HF_WEIGHTS} "
              f"(transformers.GPT2LMHeadModel.from_pretrained({s['out']!r}))")
    elif s["hf_skipped"]:
        print(f"no Hugging Face layout: {'; '.join(s['hf_skipped'])}")
    return 0
