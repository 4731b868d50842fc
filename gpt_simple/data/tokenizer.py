"""Tokenizers: byte-level (built in), tiktoken encodings and Hugging Face `tokenizers` JSON files (if installed).

Each has an id recorded in the shards, a vocabulary size and an end-of-document token id.
"""
from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import numpy as np


def _optional(module: str, spec: str):
    """An optional library a tokenizer needs, or a one-line error saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"tokenizer '{spec}' needs the {module} package (pip install {module})") from None


class ByteTokenizer:
    id = "byte"
    vocab_size = 257  # 256 byte values + end-of-document
    eos = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, tokens) -> str:
        return bytes(int(t) for t in tokens if int(t) < 256).decode("utf-8", errors="replace")


class TiktokenTokenizer:
    def __init__(self, name: str):
        tiktoken = _optional("tiktoken", "tiktoken:...")
        try:
            self._enc = tiktoken.get_encoding(name)
        except Exception as e:  # noqa: BLE001 - unknown name, or its BPE file cannot be downloaded/read
            raise ValueError(f"tokenizer 'tiktoken:{name}': cannot load the encoding "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        self.id = f"tiktoken:{name}"
        self.vocab_size = self._enc.n_vocab
        self.eos = self._enc.eot_token

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._enc.encode_ordinary(text), dtype=np.uint32)

    def decode(self, tokens) -> str:
        return self._enc.decode([int(t) for t in tokens])


class HFTokenizer:
    def __init__(self, path: str):
        Tokenizer = _optional("tokenizers", "hf:FILE").Tokenizer
        try:
            raw = Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"tokenizer 'hf:{path}': cannot read ({e.strerror})") from None
        try:
            self._tok = Tokenizer.from_str(raw.decode())
        except Exception as e:  # noqa: BLE001 - not a tokenizers JSON file
            raise ValueError(f"tokenizer 'hf:{path}': not a Hugging Face tokenizer.json ({e})") from None
        self.id = f"hf:{Path(path).name}:{hashlib.sha256(raw).hexdigest()[:12]}"
        self.vocab_size = self._tok.get_vocab_size()
        eos = next((t for t in ("<|endoftext|>", "</s>", "<eos>") if self._tok.token_to_id(t) is not None), None)
        self.eos = self._tok.token_to_id(eos) if eos else self.vocab_size
        self.vocab_size = max(self.vocab_size, self.eos + 1)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def decode(self, tokens) -> str:
        return self._tok.decode([int(t) for t in tokens])


def get_tokenizer(spec: str):
    """'byte', 'tiktoken:gpt2', or 'hf:path/to/tokenizer.json'; the id stored in shards maps back here."""
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("tiktoken:"):
        return TiktokenTokenizer(spec.split(":", 1)[1])
    if spec.startswith("hf:"):
        return HFTokenizer(spec.split(":", 1)[1])
    raise ValueError(f"unknown tokenizer {spec!r} (use 'byte', 'tiktoken:NAME' or 'hf:FILE.json')")

