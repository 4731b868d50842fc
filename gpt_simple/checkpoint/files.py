"""What a checkpoint is on disk, and reading it safely.

A checkpoint directory holds the DCP shards of the sharded part (model + optimizer; each rank writes its own),
meta.json (written by rank 0: step, kind, and under each part's name the state of the global parts and the
manifest of the sharded one; see gpt_simple/state.py), one JSON file per rank and per-rank part
(rng/rank-R.json), and COMMITTED, written last. Discovery sees committed directories only, so an interrupted
save is never loaded.

Nothing from disk is unpickled into arbitrary objects: meta.json and the RNG files are JSON, tensors are read
by DCP with torch.load(weights_only=True), DCP's own .metadata file goes through an allow-list unpickler
(only DCP's metadata dataclasses, torch.Size, dtypes and paths), and DCP's non-tensor entries (optimizer
hyper-parameters) are read with torch.load(weights_only=True) instead of DCP's default weights_only=False.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import pickle
import re
import os
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from gpt_simple.config import ConfigError, ModelConfig

COMMITTED = "COMMITTED"
META = "meta.json"
# {"algorithm": "crc32", "block_bytes": B, "files": {relative path: {"bytes": n, "crc32": [hex per B-byte block]}}}
CHECKSUMS = "CHECKSUMS.json"
CHECKSUM_PART = ".checksums-rank-{rank}.json"  # one rank's fragment, merged into CHECKSUMS at the commit
CHECKSUM_ALGORITHM = "crc32"
CHECKSUM_BLOCK = 32 << 20  # one CRC per block: blocks are checked in parallel threads (zlib releases the GIL)
CHECKSUM_READ = 1 << 20  # bytes per read while hashing a block: small enough to stay in the CPU's cache
_HASH_THREADS = max(1, min(4, os.cpu_count() or 1))
_buffers = threading.local()
META_FORMAT = 2
CHECKSUMS_SINCE_FORMAT = 2  # every checkpoint of this meta.json format or later was committed with its CHECKSUMS
KINDS = {"periodic": "", "shutdown": "-shutdown", "final": "-final"}
NAME_RE = re.compile(r"^step-(\d+)(-shutdown|-final)?$")
CORRUPT_PREFIX = "corrupt-"
TMP_PREFIX = ".tmp-"  # a save being written: .tmp-NAME, renamed to NAME once committed
TRASH_PREFIX = ".trash-"  # a checkpoint moved aside by retention while it is deleted


class CheckpointError(RuntimeError):
    """A save that failed, or a checkpoint that cannot be used."""


# DCP reports failures as CheckpointException, which derives from BaseException (not Exception): every place that
# must survive a failed read or write catches both.
DCP_ERRORS = (Exception, CheckpointException)

# OS errors that say nothing about a checkpoint's files but about where they are read (I/O, permissions, memory,
# timeouts, the network under a shared filesystem): never damage, re-raised as they are (see failures.py).
ENVIRONMENT_ERRNOS = {errno.EIO, errno.EACCES, errno.EPERM, errno.ETIMEDOUT, errno.ESTALE, errno.ENOMEM,
                      errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTUNREACH,
                      errno.ECONNRESET, errno.ECONNREFUSED, errno.ENOLINK, errno.EREMOTEIO}


def raise_if_environment(error: BaseException) -> None:
    """Inside an `except` that turns read failures into damage: let the environment's failures through."""
    if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS:
        raise error


def describe_error(error: BaseException) -> str:
    """One line for a log, an event or a status: for DCP's CheckpointException (whose str is a traceback per rank),
    each failing rank's own exception."""
    if isinstance(error, CheckpointException):
        return "; ".join(f"rank {rank}: {describe_error(exc)}" for rank, (exc, _) in sorted(error.failures.items()))
    return " ".join(f"{type(error).__name__}: {error}".split())


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    kind: str

    @property
    def name(self) -> str:
        return self.path.name


def checkpoint_name(step: int, kind: str) -> str:
    return f"step-{step}{KINDS[kind]}"


def committed_info(path: Path) -> CheckpointInfo | None:
    """The checkpoint at `path`, or None unless it is a committed step-N[-shutdown|-final] directory."""
    path = Path(path)
    m = NAME_RE.match(path.name)
    if not (m and (path / COMMITTED).exists()):
        return None
    kind = {"": "periodic", "-shutdown": "shutdown", "-final": "final"}[m.group(2) or ""]
    return CheckpointInfo(path, int(m.group(1)), kind)


def list_committed(root: Path) -> list[CheckpointInfo]:
    """Committed checkpoints, oldest first (by step; at equal steps periodic < shutdown < final)."""
    found = [info for info in map(committed_info, root.iterdir()) if info] if root.is_dir() else []
    order = {"periodic": 0, "shutdown": 1, "final": 2}
    return sorted(found, key=lambda c: (c.step, order[c.kind]))


def resume_candidates(policy: str, root: Path) -> list[CheckpointInfo]:
    """The checkpoints training.resume allows, oldest first: none ('scratch'), every committed one under `root`
    ('auto'), or the one it names (a path)."""
    if policy == "scratch":
        return []
    if policy == "auto":
        return list_committed(root)
    info = committed_info(Path(policy))
    if info is None:
        raise ConfigError(f"training.resume: {policy!r} is not a committed checkpoint directory")
    return [info]


def read_meta(path: Path) -> dict:
    """meta.json of a checkpoint, in the current layout (format 2) whatever layout it was written in."""
    try:
        meta = json.loads((Path(path) / META).read_text())
    except (OSError, ValueError) as e:
        raise_if_environment(e)
        raise CheckpointError(f"{path}: unreadable {META} ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: unreadable {META} (not a JSON object)")
    return meta if meta.get("format") == META_FORMAT else _upgrade_meta(meta)


def written_format(path: Path) -> int:
    """The meta.json format a checkpoint was written in (1: before the field existed); 0 when unreadable."""
    try:
        meta = json.loads((Path(path) / META).read_text())
    except (OSError, ValueError):
        return 0
    return int(meta.get("format", 1)) if isinstance(meta, dict) else 0


def _upgrade_meta(old: dict) -> dict:
    """Format 1 (before the parts had names) kept every field at the top level: the same facts, regrouped by
    the part that owns them, so a run saved by the earlier version resumes exactly."""
    config = old.get("config") or {}
    data = dict(old["data"], fingerprint=old.get("data_fingerprint"),
                seed=(config.get("data") or {}).get("seed")) if isinstance(old.get("data"), dict) else None
    return {"format": META_FORMAT, "step": old.get("step"), "kind": old.get("kind"), "saved_at": old.get("saved_at"),
            "run": {"config": config, "world_size": old.get("world_size"), "tokenizer": old.get("tokenizer")},
            "train": {"step": old.get("step"), "tokens": old.get("tokens")},
            "data": data,
            "model": {"architecture": old.get("architecture"), "arch_hash": old.get("arch_hash"),
                      "optimizer_state": old.get("optimizer_state", True)}}


# -- integrity ------------------------------------------------------------------------------------------------
class ChecksumMismatch(CheckpointError):
    """A committed checkpoint's file whose bytes are not those recorded at the commit."""

    def __init__(self, message: str, file: str):
        super().__init__(message)
        self.file = file


def _block_crc(path: Path, offset: int) -> str:
    """CRC-32 of one block, read in CHECKSUM_READ pieces into this thread's reused buffer. A piece that fits in
    the CPU's cache is hashed from there: reading a whole 32 MiB block first sends it through memory twice more
    (written, then read back by zlib), which made checking twice as slow (bench/verify.py)."""
    buf = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = bytearray(CHECKSUM_READ)
    view = memoryview(buf)
    crc, left = 0, CHECKSUM_BLOCK
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while left > 0:
            got = f.readinto(view[:min(CHECKSUM_READ, left)])
            if not got:
                break
            crc = zlib.crc32(view[:got], crc)
            left -= got
    return f"{crc:08x}"


def checksum_files(root: Path, names) -> dict[str, dict]:
    """{name: {"bytes": n, "crc32": [hex per CHECKSUM_BLOCK bytes]}} of files under `root`, their blocks hashed
    by a few threads. CRC-32 detects every burst error up to 32 bits (a flipped bit or byte included) and runs at
    several GB/s; it guards against storage and copy damage, not against someone forging a checkpoint."""
    root = Path(root)
    sizes = {name: (root / name).stat().st_size for name in names}
    jobs = [(name, off) for name, size in sizes.items() for off in range(0, max(size, 1), CHECKSUM_BLOCK)]
    if len(jobs) > 1 and _HASH_THREADS > 1:
        with ThreadPoolExecutor(_HASH_THREADS, thread_name_prefix="checksum") as pool:
            crcs = list(pool.map(lambda job: _block_crc(root / job[0], job[1]), jobs))
    else:
        crcs = [_block_crc(root / name, off) for name, off in jobs]
    out: dict[str, dict] = {name: {"bytes": size, "crc32": []} for name, size in sizes.items()}
    for (name, _), crc in zip(jobs, crcs):
        out[name]["crc32"].append(crc)
    return out


def file_checksum(path: Path) -> dict:
    """{"bytes": n, "crc32": [hex per block]} of one file."""
    path = Path(path)
    return checksum_files(path.parent, [path.name])[path.name]


def checkpoint_files(path: Path) -> list[str]:
    """Every file of a checkpoint directory that its checksums cover (not COMMITTED, CHECKSUMS, fragments)."""
    path = Path(path)
    skip = {COMMITTED, CHECKSUMS}
    return sorted(str(f.relative_to(path)) for f in path.rglob("*")
                  if f.is_file() and f.name not in skip and not f.name.startswith(".checksums-rank-"))


def read_checksums(path: Path) -> dict[str, dict] | None:
    """The recorded checksums of a checkpoint ({relative path: {"crc32", "bytes"}}), or None for a checkpoint
    saved before checksums existed. An unreadable CHECKSUMS file is damage (CheckpointError)."""
    file = Path(path) / CHECKSUMS
    if not file.exists():
        return None
    try:
        record = json.loads(file.read_text())
        files = record["files"]
        if record.get("algorithm") != CHECKSUM_ALGORITHM or record.get("block_bytes") != CHECKSUM_BLOCK or \
                not isinstance(files, dict):
            raise ValueError(f"unknown algorithm {record.get('algorithm')!r} / block size {record.get('block_bytes')}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise_if_environment(e)
        raise CheckpointError(f"{file}: unreadable checksums ({describe_error(e)})") from None
    return files


def verify_files(path: Path, expected: dict[str, dict], names=None) -> None:
    """Check `names` (default: every recorded file) against `expected`; ChecksumMismatch names the first file
    whose size or CRC differs, or that is missing."""
    path = Path(path)
    names = sorted(expected if names is None else names)
    for name in names:
        file = path / name
        try:
            size = file.stat().st_size
        except OSError as e:
            raise_if_environment(e)
            raise ChecksumMismatch(f"{file}: unreadable ({describe_error(e)})", name) from None
        if size != expected[name].get("bytes"):
            raise ChecksumMismatch(f"{file}: checksum mismatch ({size} bytes, {expected[name].get('bytes')} "
                                   f"recorded)", name)
    try:
        got = checksum_files(path, names)
    except OSError as e:
        raise_if_environment(e)
        raise ChecksumMismatch(f"{path}: unreadable ({describe_error(e)})", "") from None
    for name in names:
        want = expected[name].get("crc32") or []
        for i, (a, b) in enumerate(zip(got[name]["crc32"], want)):
            if a != b:
                raise ChecksumMismatch(f"{path / name}: checksum mismatch (crc32 {a}, {b} recorded, in bytes "
                                       f"{i * CHECKSUM_BLOCK}-{min((i + 1) * CHECKSUM_BLOCK, got[name]['bytes'])})",
                                       name)
        if len(got[name]["crc32"]) != len(want):
            raise ChecksumMismatch(f"{path / name}: checksum mismatch (block count)", name)


def verify_checkpoint(path: Path) -> bool:
    """Verify every file of a committed checkpoint against its CHECKSUMS (ChecksumMismatch / CheckpointError);
    False when it has no checksums (saved before they existed), True when verified."""
    expected = read_checksums(path)
    if expected is None:
        return False
    verify_files(path, expected)
    return True


def meta_tokenizer(meta: dict) -> str | None:
    return (meta.get("run") or {}).get("tokenizer")


# -- safe reading of DCP checkpoints ------------------------------------------------------------------------
_DCP_METADATA_TYPES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # maps a layout name to torch.strided etc.
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"), ("pathlib", "Path"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP writes its .metadata with pickle; read it back allowing only DCP's own metadata types."""

    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_METADATA_TYPES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not a DCP metadata "
                                     f"type; refusing to unpickle it")


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata read goes through the allow-list unpickler (tensors: weights_only)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        rank = kwargs.get("rank")
        path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not DCP metadata ({type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner reading non-tensor entries with torch.load(weights_only=True) (DCP's default is False)."""

    def load_bytes(self, read_item, value) -> None:
        from torch.distributed.checkpoint._traverse import set_element
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load_model_state(path: Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The full (unsharded) model weights of a checkpoint, in this process, without torch.distributed.

    Reads only the tensors under `prefix` (the optimizer state is skipped) and returns them with the prefix
    removed, as plain CPU tensors named like GPT.state_dict().
    """
    path = Path(path)
    metadata = read_dcp_metadata(path)
    state = {}
    for key, md in metadata.state_dict_metadata.items():
        if key.startswith(prefix) and hasattr(md, "size"):
            state[key[len(prefix):]] = torch.empty(md.size, dtype=md.properties.dtype)
    if not state:
        raise CheckpointError(f"{path}: no tensors under {prefix!r} in the checkpoint")
    try:
        with warnings.catch_warnings():  # DCP's warnings about a process-local load are not the user's concern
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({prefix.rstrip("."): state}, storage_reader=SafeFileSystemReader(path),
                     planner=SafeLoadPlanner(), no_dist=True)
    except DCP_ERRORS as e:  # DCP wraps read errors in its own exception types
        raise CheckpointError(f"{path}: cannot read the model tensors ({describe_error(e)})") from None
    return state


def read_dcp_metadata(path: Path) -> Metadata:
    """DCP's .metadata through the allow-list unpickler; any failure is a one-line CheckpointError. Reading it
    before dcp.load also keeps DCP from its fallback to per-rank metadata, which logs tracebacks."""
    try:
        return SafeFileSystemReader(path).read_metadata()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, AttributeError, TypeError, IndexError,
            CheckpointError) as e:
        raise_if_environment(e)
        raise CheckpointError(f"{path}: unreadable DCP metadata ({describe_error(e)})") from None


def model_config_from_meta(meta: dict) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    arch = (meta.get("model") or {}).get("architecture") or \
        ((meta.get("run") or {}).get("config") or {}).get("model") or {}
    return ModelConfig(**{k: v for k, v in arch.items() if k in names})
