"""The digest chain of a run's checkpoints: proof that a checkpoint is one this run committed, in this order.

At each commit rank 0 hashes the checkpoint's recorded per-file checksums (CHECKSUMS.json, sorted: the content
digest) and chains it to the digest of the checkpoint the run committed (or resumed from) before:
digest = sha256(previous_digest + content_digest). The link goes into the checkpoint's COMMITTED record and into
the save event of events.jsonl. The event log keeps the digests of checkpoints that retention has since
deleted, so the chain verifies from the oldest retained checkpoint on; a checkpoint copied in from another run
(whose digest no save event of this run records), replaced, or renamed (its digest recorded under another name)
is named by `gpt-simple verify`. CRC-32 checksums guard against damage; the chain guards against mix-ups, not
against someone who rewrites events.jsonl as well.

Import-light (no torch): `gpt-simple verify` reads it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

GENESIS = ""  # the previous digest of a run's first checkpoint (or of the first after one that predates the chain)


def content_digest(files: dict[str, dict]) -> str:
    """sha256 over a checkpoint's per-file checksums ({relative path: {"bytes", "crc32"}}), in sorted order."""
    return hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def chain_digest(previous: str, content: str) -> str:
    return hashlib.sha256((previous + content).encode()).hexdigest()


@dataclass(frozen=True)
class Link:
    """A checkpoint's place in the chain, as its COMMITTED record holds it."""
    digest: str
    previous_digest: str
    previous: str | None  # the name of the checkpoint before (None: the chain starts here)

    def record(self) -> dict:
        return {"digest": self.digest, "previous_digest": self.previous_digest, "previous": self.previous}


def make_link(files: dict[str, dict], previous: "Link | None", previous_name: str | None) -> Link:
    before = previous.digest if previous is not None else GENESIS
    return Link(chain_digest(before, content_digest(files)), before, previous_name if previous else None)


def read_link(committed_file: Path) -> Link | None:
    """The link in a COMMITTED record; None for a checkpoint that predates the chain (or an unreadable record)."""
    try:
        record = json.loads(Path(committed_file).read_text())
        return Link(str(record["digest"]), str(record["previous_digest"]), record.get("previous"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
