"""Hugging Face folders on disk: safetensors written one tensor at a time, a folder's weights read one tensor at a
time (safetensors or pytorch_model.bin, single or sharded), and model.init_from's load into a plain model.

Memory: an export holds the checkpoint's weights once plus the one tensor being converted; an import holds the
model once plus the one tensor being copied in (safetensors is read lazily, .bin memory-mapped).
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gpt_simple import hf
from gpt_simple.config import ModelConfig

CONFIG = "config.json"
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE = ("model.safetensors", "pytorch_model.bin")
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


# -- writing ---------------------------------------------------------------------------------------------------
def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...], object]], dtype: torch.dtype,
                      metadata: dict[str, str] | None = None) -> None:
    """A safetensors file from (name, shape, make) triples: the header first (shapes are known), then each
    tensor made, written and dropped in turn, where safetensors' own save_file would hold a second copy of
    every tensor."""
    header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
    width = torch.empty((), dtype=dtype).element_size()
    for name, shape, _ in tensors:
        size = width * int(torch.Size(shape).numel())
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape, make in tensors:
            t = make().to(dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: made shape {tuple(t.shape)}, declared {tuple(shape)}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)


# -- reading a folder ------------------------------------------------------------------------------------------
class WeightFolder:
    """The tensors of a Hugging Face model folder, by name, one at a time."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.where: dict[str, str] = {}  # tensor name -> file name
        self._open: dict[str, object] = {}
        for index in INDEXES:
            if (folder / index).is_file():
                try:
                    self.where = dict(json.loads((folder / index).read_text())["weight_map"])
                except (OSError, ValueError, KeyError, TypeError) as e:
                    raise hf.HFError(f"{folder / index}: unreadable weight index ({e})") from None
                break
        else:
            single = next((name for name in SINGLE if (folder / name).is_file()), None)
            if single is None:
                raise hf.HFError(f"{folder}: no model.safetensors or pytorch_model.bin (nor their .index.json)")
            self.where = {name: single for name in self._handle(single).keys()}
        self.files = sorted(set(self.where.values()))

    def _handle(self, name: str):
        if name not in self._open:
            path = self.folder / name
            try:
                if name.endswith(".safetensors"):
                    from safetensors import safe_open
                    self._open[name] = safe_open(str(path), framework="pt", device="cpu")
                else:  # never unpickle code from a downloaded file
                    self._open[name] = _load_bin(path)
            except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix: one line
                raise hf.HFError(f"{path}: cannot read the weights ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''})") from None
        return self._open[name]

    def get(self, name: str) -> torch.Tensor:
        handle = self._handle(self.where[name])
        return handle.get_tensor(name) if hasattr(handle, "get_tensor") else handle[name]

    def digests(self) -> dict[str, str]:
        out = {}
        for name in self.files:
            h = hashlib.sha256()
            with open(self.folder / name, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
            out[name] = h.hexdigest()
        return out


def _load_bin(path: Path) -> dict:
    try:  # memory-mapped: tensors are paged in as they are copied
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # the legacy (pre-zip) format


def combined_digest(digests: dict[str, str]) -> str:
    """One file's sha256 (what `sha256sum` prints); for sharded weights, the sha256 of sha256sum's lines."""
    if len(digests) == 1:
        return next(iter(digests.values()))
    return hashlib.sha256("".join(f"{d}  {n}\n" for n, d in sorted(digests.items())).encode()).hexdigest()


def read_config(folder: Path) -> dict:
    path = folder / CONFIG
    if not folder.is_dir():
        raise hf.HFError(f"model.init_from {str(folder)!r}: not a folder")
    try:
        config = json.loads(path.read_text())
    except OSError as e:
        raise hf.HFError(f"{path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise hf.HFError(f"{path}: not JSON ({e})") from None
    if not isinstance(config, dict):
        raise hf.HFError(f"{path}: not a JSON object")
    return config


# -- model.init_from -------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    path: str
    layout: str
    tensors: int
    files: dict[str, str] = field(default_factory=dict)  # file -> sha256 (when asked for)
    sha256: str = ""


def load_into(model: torch.nn.Module, folder: str | Path, cfg: ModelConfig, digest: bool = True) -> Loaded:
    """Fill a plain (unsharded) GPT with the weights of a Hugging Face folder, after checking that its config.json
    describes the same architecture as `cfg`. HFError (one line) when it does not, or a tensor is missing, extra
    or of another shape."""
    folder = Path(folder)
    config = read_config(folder)
    problem = hf.config_differences(cfg, config, str(folder / CONFIG))
    if problem:
        raise hf.HFError(problem)
    layout = config["model_type"]
    weights = WeightFolder(folder)
    names = _resolve_names(weights, layout)
    params = dict(model.named_parameters())
    used = set()
    with torch.no_grad():
        for e in hf.entries(cfg, layout):
            stored = names.get(e.hf)
            if stored is None:
                raise hf.HFError(f"{folder}: tensor {e.hf} is missing")
            used.add(stored)
            param = params.get(e.ours) if e.size else params[e.ours]  # only a GPT-2 bias may have no place
            _copy_in(e, weights.get(stored), param, f"{folder / weights.where[stored]}: {stored}")
    extra = sorted(n for n in weights.where if n not in used and not _ignorable(n, cfg))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise hf.HFError(f"{folder}: tensor {extra[0]} has no place in the model{more}")
    loaded = Loaded(str(folder.resolve()), layout, len(used))
    if digest:
        loaded.files = weights.digests()
        loaded.sha256 = combined_digest(loaded.files)
    return loaded


def _resolve_names(weights: WeightFolder, layout: str) -> dict[str, str]:
    """Our layout's name -> the name stored: GPT-2 files saved from the bare GPT2Model (or by OpenAI's original
    conversion) lack the 'transformer.' prefix."""
    out = {}
    for name in weights.where:
        out[name] = name
        if layout == hf.GPT2 and not name.startswith(("transformer.", "lm_head.")):
            out.setdefault("transformer." + name, name)
    return out


def _ignorable(name: str, cfg: ModelConfig) -> bool:
    if cfg.tie_embeddings and name == "lm_head.weight":  # HF ties it on load and ignores the stored copy
        return True
    return name.endswith(hf.BUFFER_SUFFIXES)


def _copy_in(e: hf.Entry, t: torch.Tensor, param: torch.Tensor | None, where: str) -> None:
    if param is None:  # a GPT-2 bias where model.bias = false: only zeros mean the same model
        if t.count_nonzero():
            raise hf.HFError(f"{where}: non-zero bias, but model.bias = false")
        return
    expected = e.shape(tuple(param.shape))
    if tuple(t.shape) != expected:
        raise hf.HFError(f"{where}: shape {list(t.shape)}, the config needs {list(expected)}")
    target = param[e.rows[0]:e.rows[1]] if e.rows else param
    target.copy_(e.from_hf(t.to(param.dtype)))
