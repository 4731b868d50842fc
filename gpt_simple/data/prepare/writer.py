"""Writing one bucket: shards of about SHARD_TOKENS tokens in a build folder (folder.py), renamed into place
whole when the last one is done."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from gpt_simple.data.prepare.errors import PrepareError
from gpt_simple.data.prepare.folder import BuildFolder
from gpt_simple.data.shards import ShardWriter

SHARD_TOKENS = 1 << 28    # a new shard every 256M tokens keeps files a manageable size
BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def has_shards(folder: Path) -> bool:
    """A finished bucket: its .idx files are written last."""
    return any(folder.glob("*.idx"))


class BucketWriter:
    """Shards into the build folder; commit() renames it to DATA/NAME. A build continued from a killed one
    starts with that build's finished shards (`shards`) and its last progress record (`resumed`)."""

    def __init__(self, out_dir: Path, bucket: str, tok, plan: dict, shard_tokens: int = SHARD_TOKENS,
                 force: bool = False):
        if not BUCKET_NAME.fullmatch(bucket):
            raise PrepareError(f"bucket name {bucket!r}: use letters, digits, '_', '-' and '.' "
                               f"(not starting with '.' or '-')")
        self.out, self.bucket, self.tok, self.shard_tokens = Path(out_dir), bucket, tok, shard_tokens
        self.final = self.out / bucket
        if self.final.exists() and not force and has_shards(self.final):
            raise PrepareError(f"{self.final}: bucket already exists (use --force to replace it, or choose "
                               f"another --bucket)")
        self.folder = BuildFolder(self.out, bucket, plan)
        self.tmp = self.folder.path
        self.shards = self.folder.shards
        self.resumed = self.folder.progress
        self.writer: ShardWriter | None = None

    def full(self) -> bool:
        """The open shard is full: the next document starts a new one."""
        return self.writer is not None and self.writer.n_tokens >= self.shard_tokens

    def finish_shard(self, progress: dict) -> None:
        """Close the full shard and record `progress` (where the next one starts) as the point to resume from."""
        self.writer.close()
        self.folder.record({**progress, "shards": self.shards}, self.writer.prefix)
        self.writer = None

    def add(self, tokens) -> None:
        if self.writer is None:
            self.writer = ShardWriter(self.tmp / f"shard-{self.shards:05d}", self.tok.vocab_size, self.tok.id,
                                      self.tok.eos)
            self.shards += 1
        self.writer.add(tokens)

    def commit(self, manifest: dict, replace: bool) -> bool:
        """Move the finished bucket into place; False if another process put one there first (not replace)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        (self.tmp / "prepare.json").write_text(json.dumps(manifest, indent=1) + "\n")
        self.folder.finish()
        trash = None
        if self.final.exists() and (replace or not has_shards(self.final)):
            trash = self.out / f".{self.bucket}.trash-{os.getpid()}"
            os.replace(self.final, trash)
        try:
            os.replace(self.tmp, self.final)
        except OSError:
            if not has_shards(self.final):
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)  # a concurrent prepare of the same bucket won
            return False
        finally:
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        return True

    def _drop_open_shard(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
            self.shards -= 1

    def abort(self) -> None:
        """Nothing is kept: the input or the arguments have to change before a rerun."""
        self._drop_open_shard()
        self.folder.discard()

    def suspend(self) -> Path | None:
        """Keep the finished shards for a rerun to continue (the folder, or None if there were none)."""
        self._drop_open_shard()
        if self.folder.shards == 0:
            self.folder.discard()
            return None
        self.folder.release()
        return self.tmp
