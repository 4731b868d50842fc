"""On-disk token shards: NAME.bin (flat token ids) + NAME.idx (header + document offsets).

The .idx starts with a 512-byte header: 8 magic bytes, then JSON (version, dtype, vocab_size, tokenizer, eos,
n_docs, n_tokens) padded with spaces; after it, n_docs + 1 little-endian int64 offsets into the .bin.
The .bin holds only tokens (no end-of-document tokens: the reader adds one after each document) so it can be
memory-mapped as one array. A reader checks every shard against its header and every bucket against the
others, and refuses a mismatch with a one-line ShardError that names the file.
"""
from __future__ import annotations

import json
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt_simple.fileio import publish

MAGIC = b"GPTSIDX\x01"
VERSION = 1
HEADER_BYTES = 512
VAL_SPLIT = "val"   # a bucket's validation split: BUCKET/val/*.idx (`prepare --val-docs`), never read in training
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class ShardError(ValueError):
    """A shard file that is missing, truncated or does not match what the run expects."""


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


@dataclass
class ShardHeader:
    dtype: str
    vocab_size: int
    tokenizer: str
    eos: int
    n_docs: int
    n_tokens: int
    version: int = VERSION

    def encode(self) -> bytes:
        body = json.dumps(self.__dict__, sort_keys=True).encode()
        if len(MAGIC) + len(body) > HEADER_BYTES:
            raise ShardError(f"shard header too long ({len(body)} bytes; tokenizer id {self.tokenizer!r}?)")
        return MAGIC + body.ljust(HEADER_BYTES - len(MAGIC))

    @classmethod
    def decode(cls, raw: bytes, path: Path) -> "ShardHeader":
        if len(raw) < len(MAGIC) or raw[: len(MAGIC)] != MAGIC:
            if len(raw) >= len(MAGIC) and raw[:7] == MAGIC[:7]:
                raise ShardError(f"{path}: shard index of another format revision (magic {raw[:8]!r}, "
                                 f"this code reads {MAGIC!r})")
            raise ShardError(f"{path}: not a gpt-simple shard index (bad magic)")
        if len(raw) < HEADER_BYTES:
            raise ShardError(f"{path}: truncated shard index ({len(raw)} bytes, the header alone is {HEADER_BYTES})")
        try:
            fields = json.loads(raw[len(MAGIC):HEADER_BYTES].decode())
            header = cls(**fields)
        except (ValueError, TypeError) as e:
            raise ShardError(f"{path}: corrupt shard header ({e})") from None
        if header.version != VERSION:
            raise ShardError(f"{path}: shard format version {header.version}, this code reads {VERSION}")
        if header.dtype not in DTYPES:
            raise ShardError(f"{path}: unknown token dtype {header.dtype!r}")
        if header.dtype == "uint16" and header.vocab_size > 2**16:
            raise ShardError(f"{path}: vocabulary {header.vocab_size} does not fit the shard's uint16 tokens")
        if not (0 <= header.eos < header.vocab_size) or header.n_docs < 0 or header.n_tokens < 0:
            raise ShardError(f"{path}: corrupt shard header (eos {header.eos}, vocab {header.vocab_size}, "
                             f"{header.n_docs} docs, {header.n_tokens} tokens)")
        return header


class ShardWriter:
    """Streams documents into NAME.bin; writes NAME.idx on close. Files appear atomically (tmp + rename).

    Memory is 8 bytes per document (the offsets) whatever the documents' sizes.
    """

    def __init__(self, prefix: Path, vocab_size: int, tokenizer: str, eos: int):
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        if not 0 <= eos < vocab_size:
            raise ShardError(f"end-of-document token {eos} is outside the vocabulary ({vocab_size})")
        self.vocab_size, self.tokenizer, self.eos = vocab_size, tokenizer, eos
        self.dtype = dtype_for_vocab(vocab_size)
        ShardHeader(self.dtype, vocab_size, tokenizer, eos, 0, 0).encode()  # a too-long tokenizer id fails now
        self._bin_tmp = self.prefix.with_name(self.prefix.name + ".bin.tmp")
        self._bin = open(self._bin_tmp, "wb")
        self.offsets = array("q", [0])

    def add(self, tokens) -> None:
        arr = np.asarray(tokens)
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= self.vocab_size):
            raise ShardError(f"token id out of range for vocab {self.vocab_size} "
                             f"(min {int(arr.min())}, max {int(arr.max())})")
        self._bin.write(arr.astype(DTYPES[self.dtype], copy=False).tobytes())
        self.offsets.append(self.offsets[-1] + int(arr.size))

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return self.offsets[-1]

    def close(self) -> None:
        self._bin.close()
        header = ShardHeader(self.dtype, self.vocab_size, self.tokenizer, self.eos, self.n_docs, self.n_tokens)
        idx_tmp = self.prefix.with_name(self.prefix.name + ".idx.tmp")
        with open(idx_tmp, "wb") as f:
            f.write(header.encode())
            offsets = np.frombuffer(self.offsets, dtype=np.int64)
            f.write(offsets.astype("<i8", copy=False).tobytes())
        # Not fsynced here: a build fsyncs a finished shard before recording it (prepare/folder.py).
        publish(self._bin_tmp, self.prefix.with_name(self.prefix.name + ".bin"))
        # The .idx is renamed last: a shard without its index is invisible to readers.
        publish(idx_tmp, self.prefix.with_name(self.prefix.name + ".idx"))

    def abort(self) -> None:
        """Drop what was written (nothing becomes visible)."""
        self._bin.close()
        for path in (self._bin_tmp, self.prefix.with_name(self.prefix.name + ".idx.tmp")):
            path.unlink(missing_ok=True)


class Shard:
    """One memory-mapped shard, checked against its header."""

    def __init__(self, idx_path: Path, check_offsets: bool = True):
        """check_offsets=False checks only the first and last offset (O(1), for a reader that must not touch
        every document at start-up: the stream's index build checks the rest)."""
        self.idx_path = Path(idx_path)
        self.bin_path = self.idx_path.with_suffix(".bin")
        try:
            with open(self.idx_path, "rb") as f:
                self.header = ShardHeader.decode(f.read(HEADER_BYTES), self.idx_path)
            idx_size = self.idx_path.stat().st_size
        except OSError as e:
            raise ShardError(f"{self.idx_path}: cannot read ({e.strerror})") from None
        h = self.header
        expected = HEADER_BYTES + 8 * (h.n_docs + 1)
        if idx_size != expected:
            what = "truncated" if idx_size < expected else "longer than its header says"
            raise ShardError(f"{self.idx_path}: index is {what} ({idx_size} bytes, {expected} expected for "
                             f"{h.n_docs} documents)")
        self.offsets = np.memmap(self.idx_path, dtype="<i8", mode="r", offset=HEADER_BYTES, shape=(h.n_docs + 1,))
        lengths = np.diff(np.asarray(self.offsets)) if check_offsets else None
        if int(self.offsets[0]) != 0 or int(self.offsets[-1]) != h.n_tokens or \
                (lengths is not None and (lengths < 0).any()):
            raise ShardError(f"{self.idx_path}: document offsets are inconsistent with the header (corrupt index)")
        itemsize = np.dtype(DTYPES[h.dtype]).itemsize
        if not self.bin_path.exists():
            raise ShardError(f"{self.bin_path}: missing token file for {self.idx_path.name}")
        size = self.bin_path.stat().st_size
        if size != h.n_tokens * itemsize:
            what = "truncated" if size < h.n_tokens * itemsize else "longer than its index says"
            raise ShardError(f"{self.bin_path}: token file is {what} ({size} bytes, {h.n_tokens} {h.dtype} tokens "
                             f"= {h.n_tokens * itemsize} bytes expected)")
        self.tokens = (np.memmap(self.bin_path, dtype=DTYPES[h.dtype], mode="r")
                       if h.n_tokens else np.zeros(0, dtype=DTYPES[h.dtype]))
        self._lengths = lengths

    def doc_lengths(self) -> np.ndarray:
        if self._lengths is None:
            self._lengths = np.diff(np.asarray(self.offsets))
        return self._lengths


class Bucket:
    """All shards of one bucket folder (sorted by name), seen as one list of documents."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.name = self.folder.name
        paths = sorted(self.folder.glob("*.idx"))
        if not paths:
            raise ShardError(f"{self.folder}: bucket has no shards (*.idx)")
        self.shards = [Shard(p, check_offsets=False) for p in paths]
        first = self.shards[0].header
        for s in self.shards[1:]:
            h = s.header
            if (h.tokenizer, h.vocab_size, h.eos) != (first.tokenizer, first.vocab_size, first.eos):
                raise ShardError(f"{s.idx_path}: tokenizer {h.tokenizer!r} (vocab {h.vocab_size}, eos {h.eos}) differs "
                                 f"from {first.tokenizer!r} (vocab {first.vocab_size}, eos {first.eos}) in "
                                 f"{self.shards[0].idx_path.name}: a bucket holds one tokenizer's shards")
        self.tokenizer, self.vocab_size, self.eos = first.tokenizer, first.vocab_size, first.eos
        counts = [s.header.n_docs for s in self.shards]
        self._shard_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n_docs = int(sum(counts))
        self.n_tokens = int(sum(s.header.n_tokens for s in self.shards))  # without the EOS the reader adds
        self._lengths = None

    @property
    def lengths(self) -> np.ndarray:
        """Every document's length (int64, 8 bytes per document: computed on first use; the stream does not
        use it, see data/index.py)."""
        if self._lengths is None:
            self._lengths = np.concatenate([s.doc_lengths() for s in self.shards]).astype(np.int64)
            if (self._lengths < 0).any():
                raise ShardError(f"{self.folder}: document offsets are inconsistent with the header (corrupt index)")
        return self._lengths

    def document(self, doc: int, start: int = 0, end: int | None = None) -> np.ndarray:
        """Tokens [start, end) of global document `doc`."""
        s = int(np.searchsorted(self._shard_start, doc, side="right") - 1)
        shard, local = self.shards[s], doc - int(self._shard_start[s])
        base = int(shard.offsets[local])
        stop = int(shard.offsets[local + 1]) if end is None else base + end
        return shard.tokens[base + start: stop]


def bucket_dirs(data_dir: Path) -> list[Path]:
    """Sub-folders holding shards; hidden ones (a `prepare` in progress writes .NAME.tmp-*) are not buckets."""
    return [p for p in sorted(Path(data_dir).iterdir())
            if p.is_dir() and not p.name.startswith(".") and any(p.glob("*.idx"))]


def open_buckets(data_dir: Path) -> dict[str, Bucket]:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ShardError(f"data.dir {str(data_dir)!r}: folder does not exist (run `gpt-simple prepare` first)")
    buckets = {p.name: Bucket(p) for p in bucket_dirs(data_dir)}
    if not buckets:
        raise ShardError(f"data.dir {str(data_dir)!r}: no buckets (sub-folders with *.idx shards; "
                         f"see `gpt-simple prepare`)")
    tokenizers = {(b.tokenizer, b.vocab_size, b.eos) for b in buckets.values()}
    if len(tokenizers) > 1:
        named = ", ".join(f"{n}: {b.tokenizer!r} (vocab {b.vocab_size})" for n, b in buckets.items())
        raise ShardError(f"data.dir {str(data_dir)!r}: buckets use different tokenizers ({named}); "
                         f"prepare them all with one tokenizer")
    return buckets
