"""The on-disk order of a bucket: one file per (bucket contents, data.seed, pass), memory-mapped by every rank.

A bucket's pass p is read as its documents in a seeded permutation; the stream needs, for each position i of
that order, the document (perm[i]) and the tokens consumed once it is done (ends[i] = the sum of the sizes of
documents perm[0..i], each size counting its end-of-document token). Kept in memory that is ~16 bytes per
document per rank (more with the lengths); here it is built once, written to

    BUCKET/.index/order-seed{SEED}-pass{P}.bin     (or, for a read-only bucket, GPT_SIMPLE_INDEX_DIR or
                                                    ~/.cache/gpt-simple/index/<hash of the bucket path>/)

(shards appended by a plan amendment get their own permutation and file, order-seed{SEED}-pass{P}-from{K}.bin,
over those shards only: the order of the shards before them, and its file, are left as they were; layout.py).

and memory-mapped, so a rank's resident memory holds only the pages near its cursors, whatever the size of
the bucket, and a later launch opens it in milliseconds.

File: a header of whole 4096-byte pages (8 magic bytes, its length as 8 bytes, then JSON padded with spaces: version, bucket, seed, pass, n_docs,
total, the shards' identity `key`, perm dtype, chunk size, the CRC-32 of every 1 MiB chunk of the payload and a
CRC-32 of the header itself), then the payload: perm (uint32, or uint64 past 2^32 documents), then ends
(int64). Opening checks magic, header CRC, fields against the bucket, and the file size (O(1)); each payload
chunk is checked against its CRC the first time it is read. A file that fails any check is never used: it is
rebuilt (the error is raised as IndexCorrupt, and the reader rebuilds and retries).

Building is safe when many ranks and jobs start at once: a builder holds a POSIX lock on `NAME.lock` (released
by the kernel if it dies), re-checks whether another process finished the file meanwhile, writes to a
temporary name, fsyncs, renames, and fsyncs the folder. Waiters block on the lock and then open the result. On
a filesystem without POSIX locks each process builds its own temporary file; the renames are atomic and the
contents identical, so nothing half-written is ever visible. Each build appends one line to `builds.log`.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import socket
import threading
import time
import zlib
from pathlib import Path

import numpy as np

from gpt_simple.data.shards import Bucket, ShardError
from gpt_simple.fileio import append_jsonl, write_atomic

MAGIC = b"GPTSORD\x01"
VERSION = 1
HEADER_BYTES = 4096
CHUNK = 1 << 20
INDEX_DIR = ".index"


class IndexCorrupt(Exception):
    """An index file that fails a check (never used; the caller rebuilds it)."""


def permutation_seed(name: str, seed: int, pass_: int, tag: str = "") -> int:
    # Pass 0 keeps the historical seed (data.seed, bucket name): checkpoints of single-pass runs stay valid. A tag
    # (documents appended by a plan amendment, layout.py) seeds their own permutation apart from the bucket's.
    text = f"{seed}:{name}" if pass_ == 0 else f"{seed}:{name}:pass{pass_}"
    text += f":{tag}" if tag else ""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def permutation(name: str, n_docs: int, seed: int, pass_: int = 0, tag: str = "") -> np.ndarray:
    return np.random.default_rng(permutation_seed(name, seed, pass_, tag)).permutation(n_docs)


def bucket_key(bucket: Bucket) -> str:
    """The shards' identity: names, headers, sizes and modification times (a re-prepared bucket gets a new one)."""
    parts = []
    for s in bucket.shards:
        st_idx, st_bin = s.idx_path.stat(), s.bin_path.stat()
        parts.append([s.idx_path.name, s.header.n_docs, s.header.n_tokens, st_idx.st_size, st_idx.st_mtime_ns,
                      st_bin.st_size, st_bin.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def index_folder(bucket: Bucket) -> Path:
    """BUCKET/.index if it can be written, else a cache folder of this user (said once per bucket and process)."""
    folder = bucket.folder / INDEX_DIR
    try:
        folder.mkdir(exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    root = Path(os.environ.get("GPT_SIMPLE_INDEX_DIR") or Path.home() / ".cache" / "gpt-simple" / "index")
    tag = hashlib.sha256(str(bucket.folder.resolve()).encode()).hexdigest()[:16]
    cache = root / f"{bucket.name}-{tag}"
    cache.mkdir(parents=True, exist_ok=True)
    if str(folder) not in _CACHED:
        _CACHED.add(str(folder))
        logging.getLogger("gpt_simple").warning(f"{folder}: cannot be written; the order of bucket "
                                                f"{bucket.name!r} is built in {cache} instead")
    return cache


_CACHED: set[str] = set()


def _perm_dtype(n_docs: int) -> np.dtype:
    return np.dtype("<u4") if n_docs < 2**32 else np.dtype("<u8")


class Order:
    """One pass's order, memory-mapped: perm[i] (document at position i) and ends[i] (tokens consumed after it)."""

    def __init__(self, path: Path, n_docs: int, total: int, expect: dict):
        self.path = Path(path)
        self.n_docs, self.total = n_docs, total
        fd = os.open(self.path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            self.inode = (st.st_dev, st.st_ino)
            head = os.pread(fd, 16, 0)
            if len(head) < 16 or head[:8] != MAGIC:
                raise IndexCorrupt(f"{self.path}: bad magic or truncated header")
            self.header_bytes = hb = int.from_bytes(head[8:16], "little")
            if hb % HEADER_BYTES or not HEADER_BYTES <= hb <= st.st_size:
                raise IndexCorrupt(f"{self.path}: truncated header")
            header = self._header(os.pread(fd, hb - 16, 16))
            for k, v in expect.items():
                if header.get(k) != v:
                    raise IndexCorrupt(f"{self.path}: {k} is {header.get(k)!r}, expected {v!r}")
            try:
                self.perm_dtype = np.dtype(header["perm_dtype"])
                self.crcs = [int(c) for c in header["crcs"]]
            except (KeyError, TypeError, ValueError):
                raise IndexCorrupt(f"{self.path}: incomplete header") from None
            perm_bytes, ends_bytes = n_docs * self.perm_dtype.itemsize, n_docs * 8
            self.payload = perm_bytes + ends_bytes
            if st.st_size != hb + self.payload:
                raise IndexCorrupt(f"{self.path}: {st.st_size} bytes, {hb + self.payload} expected")
            if len(self.crcs) != -(-self.payload // CHUNK):
                raise IndexCorrupt(f"{self.path}: chunk table of the wrong length")
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if st.st_size else None
        finally:
            os.close(fd)
        if n_docs:
            self.perm = np.frombuffer(self._mm, dtype=self.perm_dtype, count=n_docs, offset=hb)
            self.ends = np.frombuffer(self._mm, dtype="<i8", count=n_docs, offset=hb + perm_bytes)
        else:
            self.perm = np.zeros(0, dtype=self.perm_dtype)
            self.ends = np.zeros(0, dtype="<i8")
        self._perm_bytes = perm_bytes
        self._checked = bytearray(len(self.crcs))

    def _header(self, raw: bytes) -> dict:
        try:
            header = json.loads(raw.decode())
        except ValueError:
            raise IndexCorrupt(f"{self.path}: corrupt header") from None
        crc = header.pop("header_crc", None)
        if crc != zlib.crc32(json.dumps(header, sort_keys=True).encode()) or header.get("version") != VERSION:
            raise IndexCorrupt(f"{self.path}: header checksum or version mismatch")
        return header

    def check(self, lo: int, hi: int) -> None:
        """Verify the chunks holding positions [lo, hi) of perm and ends (each chunk once)."""
        if hi <= lo:
            return
        p = self.perm_dtype.itemsize
        for a, b in ((lo * p, hi * p), (self._perm_bytes + lo * 8, self._perm_bytes + hi * 8)):
            for c in range(a // CHUNK, (b - 1) // CHUNK + 1):
                if not self._checked[c]:
                    start = self.header_bytes + c * CHUNK
                    block = self._mm[start:min(start + CHUNK, self.header_bytes + self.payload)]
                    if zlib.crc32(block) != self.crcs[c]:
                        raise IndexCorrupt(f"{self.path}: checksum mismatch in chunk {c}")
                    self._checked[c] = 1

    def end_before(self, i: int) -> int:
        """Tokens consumed before position i."""
        if i == 0:
            return 0
        self.check(i - 1, i)
        return int(self.ends[i - 1])

    def close(self) -> None:
        self.perm = self.ends = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still alive somewhere; the GC unmaps it
                pass
            self._mm = None


def build(bucket: Bucket, seed: int, pass_: int, key: str, path: Path, tag: str = "") -> None:
    """Compute one pass's order and write it atomically to `path`."""
    t0 = time.monotonic()
    lengths = np.empty(bucket.n_docs, dtype=np.int64)
    at = 0
    for s in bucket.shards:
        offsets = np.asarray(s.offsets)
        n = len(offsets) - 1
        np.subtract(offsets[1:], offsets[:-1], out=lengths[at:at + n])
        if n and (int(offsets[0]) != 0 or (lengths[at:at + n] < 0).any()):
            raise ShardError(f"{s.idx_path}: document offsets are inconsistent with the header (corrupt index)")
        at += n
    perm = permutation(bucket.name, bucket.n_docs, seed, pass_, tag)
    ends = lengths[perm]
    del lengths
    ends += 1
    np.cumsum(ends, out=ends)
    perm_dtype = _perm_dtype(bucket.n_docs)
    perm = perm.astype(perm_dtype)
    payload = [memoryview(perm).cast("B"), memoryview(ends.astype("<i8", copy=False)).cast("B")]
    crcs = []
    # CRC per 1 MiB chunk of the concatenated payload
    size = sum(len(m) for m in payload)
    pos = 0
    pieces = []
    for m in payload:
        pieces.append((pos, m))
        pos += len(m)
    for c in range(-(-size // CHUNK)):
        a, b = c * CHUNK, min((c + 1) * CHUNK, size)
        crc = 0
        for base, m in pieces:
            lo, hi = max(a, base), min(b, base + len(m))
            if lo < hi:
                crc = zlib.crc32(m[lo - base:hi - base], crc)
        crcs.append(crc)
    header = {"version": VERSION, "bucket": bucket.name, "seed": seed, "pass": pass_, "n_docs": bucket.n_docs,
              "total": bucket.n_tokens + bucket.n_docs, "key": key, "perm_dtype": perm_dtype.str, "chunk": CHUNK,
              "crcs": crcs, **({"tag": tag} if tag else {})}
    header["header_crc"] = zlib.crc32(json.dumps(header, sort_keys=True).encode())
    body = json.dumps(header, sort_keys=True).encode()
    hb = -(-(16 + len(body)) // HEADER_BYTES) * HEADER_BYTES  # whole pages: the payload stays page-aligned
    # the temporary name is unique per host, process and thread: several hosts may build the same file at once
    write_atomic(path, [MAGIC + hb.to_bytes(8, "little") + body.ljust(hb - 16), *payload], sync_dir=True)
    append_jsonl(path.parent / "builds.log", {"file": path.name, "host": socket.gethostname(), "pid": os.getpid(),
                                              "seconds": round(time.monotonic() - t0, 3), "n_docs": bucket.n_docs})


def _lock(path: Path):
    """An exclusive POSIX lock on `path` (blocking), or None where the filesystem has none."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise
    return fd


def _unlock(fd) -> None:
    if fd is not None:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        os.close(fd)


def open_order(bucket: Bucket, seed: int, pass_: int, key: str | None = None, bad_inode=None,
               tag: str = "") -> Order:
    """The order of `pass_` over `bucket` (with a tag: over appended shards, in their own permutation and file),
    built if missing or failing its checks (never a damaged one). A valid order beside the bucket is used even
    where the bucket is read-only; only building needs a writable folder."""
    key = key or bucket_key(bucket)
    name = f"order-seed{seed}-pass{pass_}{'-' + tag if tag else ''}.bin"
    n_docs, total = bucket.n_docs, bucket.n_tokens + bucket.n_docs
    expect = {"bucket": bucket.name, "seed": seed, "pass": pass_, "n_docs": n_docs, "total": total, "key": key,
              "tag": tag or None}

    def attempt(path: Path) -> Order | None:
        try:
            order = Order(path, n_docs, total, expect)
        except (FileNotFoundError, NotADirectoryError, IndexCorrupt):
            return None
        if bad_inode is not None and order.inode == bad_inode:
            order.close()
            return None
        return order

    order = attempt(bucket.folder / INDEX_DIR / name)
    if order is not None:
        return order
    folder = index_folder(bucket)
    path = folder / name
    order = attempt(path) if folder != bucket.folder / INDEX_DIR else None
    if order is not None:
        return order
    with _THREAD_LOCKS_GUARD:  # POSIX locks are per process: threads of one process queue here first
        thread_lock = _THREAD_LOCKS.setdefault(str(path), threading.Lock())
    with thread_lock:
        fd = _lock(folder / f"{path.name}.lock")
        try:
            order = attempt(path)  # another process may have built it while this one waited
            if order is None:
                build(bucket, seed, pass_, key, path, tag)
                order = Order(path, n_docs, total, expect)
        finally:
            _unlock(fd)
    return order


_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()
