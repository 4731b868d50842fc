"""The Hugging Face layouts, both ways: GPT-2 (GPT2LMHeadModel) and Llama (LlamaForCausalLM) <-> gpt-simple.

The one place that knows the mapping: config.json <-> ModelConfig (`layout_of`, `hf_config`, `config_differences`)
and tensor names, slices and shapes (`entries`). export.py writes with it; model.init_from (hf_io.load_into)
reads with it.

Which layout: learned positions + LayerNorm + GELU is GPT-2's; RoPE + RMSNorm + SwiGLU (any GQA, with or without
bias terms: Llama's attention_bias / mlp_bias) is Llama's. Other mixes have no equivalent and are named.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt_simple.config import ModelConfig
from gpt_simple.model import swiglu_hidden

GPT2, LLAMA = "gpt2", "llama"
CLASSES = {GPT2: "GPT2LMHeadModel", LLAMA: "LlamaForCausalLM"}
# Tensors some saved models carry that are buffers, not weights (GPT-2's causal mask, Llama's rotary table).
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
GPT2_GELU = ("gelu_new", "gelu_pytorch_tanh")  # GELU's tanh form, which our MLP computes


class HFError(ValueError):
    """A Hugging Face folder or layout that does not fit: one line naming the field or file, exit code 2."""


# -- which layout ------------------------------------------------------------------------------------------
def layout_of(cfg: ModelConfig) -> tuple[str, list[str]]:
    """(the layout the architecture belongs to, the settings that layout cannot hold: empty when it can)."""
    why = []
    if cfg.pos_embedding == "learned":
        if cfg.norm != "layernorm":
            why.append(f"model.norm = {cfg.norm!r} with learned positions (GPT-2 uses LayerNorm)")
        if cfg.mlp != "gelu":
            why.append(f"model.mlp = {cfg.mlp!r} with learned positions (GPT-2 uses a GELU MLP)")
        if cfg.n_kv_head not in (0, cfg.n_head):
            why.append(f"model.n_kv_head = {cfg.n_kv_head} with learned positions (GPT-2 has no grouped-query "
                       f"attention)")
        return GPT2, why
    if cfg.norm != "rmsnorm":
        why.append(f"model.norm = {cfg.norm!r} with rope (Llama uses RMSNorm)")
    if cfg.mlp != "swiglu":
        why.append(f"model.mlp = {cfg.mlp!r} with rope (Llama uses a SwiGLU MLP)")
    return LLAMA, why


def gpt2_hidden(cfg: ModelConfig) -> int:
    return int(cfg.mlp_ratio * cfg.n_embd)


def hf_config(cfg: ModelConfig, layout: str, eos: int | None = None) -> dict:
    """config.json of the layout (fp32; export sets dtype)."""
    if layout == GPT2:
        config = {
            "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_inner": gpt2_hidden(cfg),
            "activation_function": "gelu_new",  # our MLP uses the tanh approximation of GELU
            "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False}
    else:
        config = {
            "hidden_size": cfg.n_embd, "intermediate_size": swiglu_hidden(cfg), "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head or cfg.n_head,
            "head_dim": cfg.n_embd // cfg.n_head, "hidden_act": "silu", "max_position_embeddings": cfg.block_size,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
            # transformers >= 5 reads rope_parameters; older versions and vLLM read rope_theta
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "attention_dropout": cfg.dropout, "pretraining_tp": 1}
    config = {"architectures": [CLASSES[layout]], "model_type": layout, "vocab_size": cfg.vocab_size, **config,
              "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": 0.02, "use_cache": True,
              "dtype": "float32", "torch_dtype": "float32"}
    if eos is not None:
        config.update(bos_token_id=eos, eos_token_id=eos)
    return config


# -- config.json -> the checks of a config against it ---------------------------------------------------------
def _rope(hf: dict) -> tuple[float | None, str]:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))  # transformers' default when unset
    return theta, params.get("rope_type", params.get("type", "default"))


def _required(cfg: ModelConfig, hf: dict, layout: str) -> list[tuple[str, object, str, object]]:
    """(our field, our value, config.json key, its value) pairs that must be equal."""
    kv = cfg.n_kv_head or cfg.n_head
    if layout == GPT2:
        return [("pos_embedding", cfg.pos_embedding, "model_type", "gpt2 (learned positions)")
                if cfg.pos_embedding != "learned" else None,
                ("norm", cfg.norm, "model_type", "gpt2 (layernorm)") if cfg.norm != "layernorm" else None,
                ("mlp", cfg.mlp, "model_type", "gpt2 (gelu)") if cfg.mlp != "gelu" else None,
                ("vocab_size", cfg.vocab_size, "vocab_size", hf.get("vocab_size")),
                ("block_size", cfg.block_size, "n_positions", hf.get("n_positions")),
                ("n_layer", cfg.n_layer, "n_layer", hf.get("n_layer")),
                ("n_head", cfg.n_head, "n_head", hf.get("n_head")),
                ("n_kv_head", kv, "n_head", hf.get("n_head")),
                ("n_embd", cfg.n_embd, "n_embd", hf.get("n_embd")),
                ("mlp_ratio", gpt2_hidden(cfg), "n_inner", hf.get("n_inner") or 4 * (hf.get("n_embd") or 0)),
                ("norm_eps", cfg.norm_eps, "layer_norm_epsilon", hf.get("layer_norm_epsilon", 1e-5)),
                ("tie_embeddings", cfg.tie_embeddings, "tie_word_embeddings", hf.get("tie_word_embeddings", True))]
    theta, _ = _rope(hf)
    heads = hf.get("num_attention_heads")
    return [("pos_embedding", cfg.pos_embedding, "model_type", "llama (rope)")
            if cfg.pos_embedding != "rope" else None,
            ("norm", cfg.norm, "model_type", "llama (rmsnorm)") if cfg.norm != "rmsnorm" else None,
            ("mlp", cfg.mlp, "model_type", "llama (swiglu)") if cfg.mlp != "swiglu" else None,
            ("vocab_size", cfg.vocab_size, "vocab_size", hf.get("vocab_size")),
            ("n_layer", cfg.n_layer, "num_hidden_layers", hf.get("num_hidden_layers")),
            ("n_head", cfg.n_head, "num_attention_heads", heads),
            ("n_kv_head", kv, "num_key_value_heads", hf.get("num_key_value_heads") or heads),
            ("n_embd", cfg.n_embd, "hidden_size", hf.get("hidden_size")),
            ("mlp_ratio", swiglu_hidden(cfg), "intermediate_size", hf.get("intermediate_size")),
            ("norm_eps", cfg.norm_eps, "rms_norm_eps", hf.get("rms_norm_eps", 1e-6)),
            ("rope_theta", cfg.rope_theta, "rope_theta", theta),
            ("tie_embeddings", cfg.tie_embeddings, "tie_word_embeddings", hf.get("tie_word_embeddings", False)),
            ("bias", cfg.bias, "attention_bias", hf.get("attention_bias", False)),
            ("bias", cfg.bias, "mlp_bias", hf.get("mlp_bias", False))]


def config_differences(cfg: ModelConfig, hf: dict, where: str) -> str | None:
    """The first way `cfg` cannot hold the model of config.json `hf` (read from `where`), as one line; None when
    it can. Every field that decides a weight's shape or meaning must be equal."""
    layout = hf.get("model_type")
    if layout not in CLASSES:
        return (f"{where}: model_type {layout!r} is not supported (model.init_from takes a GPT-2 or Llama "
                f"layout: model_type 'gpt2' or 'llama')")
    for name, ours, key, theirs in filter(None, _required(cfg, hf, layout)):
        if ours != theirs:
            shown = f"{ours!r}" if name != "mlp_ratio" else f"{cfg.mlp_ratio!r}: an MLP width of {ours}"
            return f"model.{name} ({shown}) differs from {where} {key} ({theirs!r})"
    return _unsupported(cfg, hf, layout, where)


def _unsupported(cfg: ModelConfig, hf: dict, layout: str, where: str) -> str | None:
    """Settings of config.json that no gpt-simple config computes."""
    if layout == GPT2:
        act = hf.get("activation_function", "gelu_new")
        if act not in GPT2_GELU:
            return f"{where}: activation_function {act!r} is not supported (model.mlp 'gelu' is gelu_new)"
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            return f"{where}: scale_attn_by_inverse_layer_idx / scale_attn_weights: only GPT-2's default scaling"
        return None
    if hf.get("hidden_act", "silu") != "silu":
        return f"{where}: hidden_act {hf.get('hidden_act')!r} is not supported (model.mlp 'swiglu' is silu)"
    head_dim = hf.get("head_dim") or cfg.n_embd // cfg.n_head
    if head_dim != cfg.n_embd // cfg.n_head:
        return f"{where}: head_dim ({head_dim}) is not hidden_size / num_attention_heads ({cfg.n_embd // cfg.n_head})"
    if _rope(hf)[1] != "default":
        return f"{where}: rope type {_rope(hf)[1]!r} is not supported (only the default RoPE)"
    if cfg.block_size > (hf.get("max_position_embeddings") or cfg.block_size):
        return (f"model.block_size ({cfg.block_size}) exceeds {where} max_position_embeddings "
                f"({hf.get('max_position_embeddings')})")
    return None


# -- tensors -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One Hugging Face tensor: rows `rows` of our tensor `ours`, transposed (GPT-2's Conv1D stores (in, out)) or
    with its rows permuted per head from RoPE's interleaved pairs (ours) to rotate_half's halves (HF's)."""
    hf: str
    ours: str
    rows: tuple[int, int] | None = None
    transposed: bool = False
    heads: int = 0  # > 0: permute rows for RoPE across this many heads
    size: int = 0   # > 0: a GPT-2 bias that a model without biases stores as zeros of this size

    def shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
        if self.rows:
            ours = (self.rows[1] - self.rows[0], *ours[1:])
        return tuple(reversed(ours)) if self.transposed else tuple(ours)

    def to_hf(self, t: torch.Tensor) -> torch.Tensor:
        if self.rows:
            t = t[self.rows[0]:self.rows[1]]
        if self.heads:  # pair i of a head (rows 2i, 2i+1) -> rows i and i + head_dim / 2
            t = t.reshape(self.heads, -1, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)
        return (t.t() if self.transposed else t).contiguous()

    def from_hf(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse of to_hf, for the rows `rows` of our tensor."""
        if self.transposed:
            t = t.t()
        if self.heads:
            t = t.reshape(self.heads, 2, -1, *t.shape[1:]).transpose(1, 2).reshape(t.shape)
        return t


def entries(cfg: ModelConfig, layout: str) -> list[Entry]:
    """Every tensor of the layout's state dict, in order (a tied head is not one: HF ties it on load)."""
    top = _gpt2_top(cfg) if layout == GPT2 else [Entry("model.embed_tokens.weight", "tok_emb.weight"),
                                                 Entry("model.norm.weight", "norm.weight")]
    block = _gpt2_block if layout == GPT2 else _llama_block
    out = top + [e for i in range(cfg.n_layer) for e in block(cfg, i)]
    if not cfg.tie_embeddings:
        out.append(Entry("lm_head.weight", "head.weight"))
    return out


def _gpt2_top(cfg: ModelConfig) -> list[Entry]:
    C = cfg.n_embd
    return [Entry("transformer.wte.weight", "tok_emb.weight"), Entry("transformer.wpe.weight", "pos_emb.weight"),
            Entry("transformer.ln_f.weight", "norm.weight"), Entry("transformer.ln_f.bias", "norm.bias", size=C)]


def _gpt2_block(cfg: ModelConfig, i: int) -> list[Entry]:
    b, h, C = f"blocks.{i}.", f"transformer.h.{i}.", cfg.n_embd
    out = []
    for theirs, ours, width in (("ln_1", "norm1", C), ("attn.c_attn", "attn.qkv", 3 * C),
                                ("attn.c_proj", "attn.proj", C), ("ln_2", "norm2", C),
                                ("mlp.c_fc", "mlp.up", gpt2_hidden(cfg)), ("mlp.c_proj", "mlp.down", C)):
        out.append(Entry(f"{h}{theirs}.weight", f"{b}{ours}.weight", transposed=not theirs.startswith("ln_")))
        out.append(Entry(f"{h}{theirs}.bias", f"{b}{ours}.bias", size=width))
    return out


def _llama_block(cfg: ModelConfig, i: int) -> list[Entry]:
    b, h = f"blocks.{i}.", f"model.layers.{i}."
    head_dim, kv = cfg.n_embd // cfg.n_head, cfg.n_kv_head or cfg.n_head
    q, k, hidden = cfg.n_head * head_dim, kv * head_dim, swiglu_hidden(cfg)
    kinds = ["weight", "bias"] if cfg.bias else ["weight"]
    out = [Entry(f"{h}input_layernorm.weight", f"{b}norm1.weight"),
           Entry(f"{h}post_attention_layernorm.weight", f"{b}norm2.weight")]
    for kind in kinds:
        qkv, up = f"{b}attn.qkv.{kind}", f"{b}mlp.up.{kind}"
        out += [Entry(f"{h}self_attn.q_proj.{kind}", qkv, (0, q), heads=cfg.n_head),
                Entry(f"{h}self_attn.k_proj.{kind}", qkv, (q, q + k), heads=kv),
                Entry(f"{h}self_attn.v_proj.{kind}", qkv, (q + k, q + 2 * k)),
                Entry(f"{h}self_attn.o_proj.{kind}", f"{b}attn.proj.{kind}"),
                Entry(f"{h}mlp.gate_proj.{kind}", up, (0, hidden)),  # our fused up: gate first, then value
                Entry(f"{h}mlp.up_proj.{kind}", up, (hidden, 2 * hidden)),
                Entry(f"{h}mlp.down_proj.{kind}", f"{b}mlp.down.{kind}")]
    return out


def export_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, layout: str, dtype: torch.dtype):
    """(HF name, shape, make) for every tensor of the layout; `make()` converts one tensor when it is written,
    so that only one converted tensor exists at a time."""
    def make(e: Entry):
        if e.ours not in state:  # a GPT-2 bias of a model without biases: zeros compute the same function
            return lambda: torch.zeros(e.size, dtype=dtype)
        return lambda: e.to_hf(state[e.ours]).to(dtype)

    return [(e.hf, e.shape(tuple(state[e.ours].shape)) if e.ours in state else (e.size,), make(e))
            for e in entries(cfg, layout)]
