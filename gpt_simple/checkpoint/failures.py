"""What a failed checkpoint load was: damage, the environment, or a bug. The loader acts on the class.

- damage (a checksum that does not match, a missing or short file, unreadable metadata): the checkpoint is
  unusable; the loader falls back to the one before and moves the damaged one aside (quarantine).
- environment (out of memory, an I/O error, a refused permission, a timeout, a lost peer): the checkpoint may be
  fine; nothing is renamed and the launch ends as a transient, resumable failure.
- anything else is a bug: the launch ends in ERROR and the checkpoint is left as it is.

A read error of a type that does not say which it is (torch's deserialisation raises RuntimeError for a short
file and for a bug alike) counts as damage only when the checkpoint's checksums prove it (loader.py checks them
after such an error); without checksums the exception types below decide.
"""
from __future__ import annotations

import pickle
import struct
import zipfile

import torch
from torch.distributed.checkpoint import CheckpointException

from gpt_simple.checkpoint.files import ENVIRONMENT_ERRNOS, CheckpointError
from gpt_simple.parallel import is_fabric_failure

DAMAGE, BUG, ENVIRONMENT = 1, 2, 3  # ordered: the ranks agree on the highest (an environment failure on one
# rank can surface as anything on another; a bug must never quarantine a checkpoint)

DAMAGE_TYPES = (CheckpointError, FileNotFoundError, IsADirectoryError, NotADirectoryError, EOFError,
                pickle.UnpicklingError, struct.error, zipfile.BadZipFile, UnicodeDecodeError)


class LoadUnavailable(RuntimeError):
    """A checkpoint that could not be read for a reason outside it (memory, storage, network): transient, the
    checkpoint untouched. launch.is_transient treats it as resumable."""


def causes(error: BaseException) -> list[BaseException]:
    """The exceptions behind `error`: DCP's CheckpointException carries one per failing rank."""
    if isinstance(error, CheckpointException):
        return [e for exc, _ in error.failures.values() for e in causes(exc)]
    return [error]


# torch's out-of-memory types: the generic one of recent versions and CUDA's
OUT_OF_MEMORY = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)


def _one(error: BaseException) -> int:
    if isinstance(error, (MemoryError, TimeoutError, ConnectionError, LoadUnavailable, *OUT_OF_MEMORY)):
        return ENVIRONMENT
    if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS:
        return ENVIRONMENT
    if isinstance(error, DAMAGE_TYPES):
        return DAMAGE
    return ENVIRONMENT if is_fabric_failure(error) else BUG  # a lost peer mid-load is the fabric's


def classify(error: BaseException | None) -> int:
    """0 for no error, else DAMAGE, BUG or ENVIRONMENT (the highest of the ranks' causes)."""
    if error is None:
        return 0
    return max(_one(e) for e in causes(error))
