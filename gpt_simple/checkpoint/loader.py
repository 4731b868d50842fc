"""Loading a checkpoint into the run's parts: verified (checksums, manifests before any tensor), and what a failed
load leads to (failures.py classifies it, the ranks agree): damage falls back to the checkpoint before and moves
the damaged one aside as corrupt-NAME; a failure of the environment (memory, storage, network) ends the launch as a
transient failure and touches nothing; a bug ends it in ERROR and touches nothing."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from gpt_simple.checkpoint.base import ManagerBase
from gpt_simple.checkpoint.chain import read_link
from gpt_simple.checkpoint.failures import BUG, DAMAGE, ENVIRONMENT, LoadUnavailable, classify
from gpt_simple.checkpoint.files import (CHECKSUMS, CHECKSUMS_SINCE_FORMAT, COMMITTED, CORRUPT_PREFIX, DCP_ERRORS,
                                         META, CheckpointError, CheckpointInfo, SafeFileSystemReader,
                                         SafeLoadPlanner, describe_error, raise_if_environment, read_checksums,
                                         read_dcp_metadata, read_meta, verify_files, written_format)
from gpt_simple.config import ConfigError
from gpt_simple.data.curriculum import DataError
from gpt_simple.runtime import log


def _is_dcp_file(name: str) -> bool:
    """A file DCP writes and reads (shards, .metadata), as opposed to gpt-simple's own JSON."""
    return name.endswith(".distcp") or Path(name).name.startswith(".metadata") or name.endswith(".metadata")


class Loading(ManagerBase):
    """The manager's loading and fallback (a mixin of CheckpointManager); every rank takes part."""

    def _init_loading(self, verify: bool) -> None:
        self.verify = verify  # check a checkpoint's CHECKSUMS before loading it (training.verify_checkpoints)
        self.unchecked: str | None = None  # a checkpoint loaded without checksums (its format predates them): why

    def load(self, info: CheckpointInfo) -> None:
        """Load every part from `info`: the sharded parts' manifests first (a different architecture raises
        ArchitectureMismatch before any tensor is read), then the global and per-rank parts, then the tensors.

        A part that refuses the checkpoint (ConfigError, DataError: another architecture, other data) is a
        user-facing incompatibility, raised at once; anything else is damage (CheckpointError)."""
        read_dcp_metadata(info.path)  # first: a malicious pickle is refused as such (allow-list unpickler)
        self._verify(info, tensors=False)  # meta.json and the per-rank JSON, before any part reads them
        meta = read_meta(info.path)
        try:
            for name, part in self._scoped("sharded").items():
                part.load_manifest(meta.get(name) or {}, info.path)
            for name, part in self._scoped("global").items():
                part.load_state_dict(meta.get(name))  # None: saved before the part existed (the part decides)
        except (ConfigError, DataError) as e:
            where = str(info.path)
            raise type(e)(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{info.path}: unusable {META} ({describe_error(e)})") from None
        state, keys = self._tensors()
        try:
            dcp.load(state, storage_reader=SafeFileSystemReader(str(info.path)), planner=SafeLoadPlanner(),
                     **self._scope())
        except DCP_ERRORS as e:
            raise self._read_failure(info, e) from None
        # DCP's files are checked after DCP has read them (safely) into `state`, before any part takes them: the
        # bytes are in the page cache by then, and a file refused by the safe readers keeps that reason
        self._verify(info, tensors=True)
        for name, part in self._scoped("sharded").items():
            part.load_state_dict({k: state[k] for k in keys[name]})
        for name, part in self._scoped("rank").items():
            path = info.path / name / f"rank-{self.rank}.json"
            try:
                part.load_state_dict(json.loads(path.read_text()) if path.exists() else None)
            except (OSError, KeyError, TypeError, ValueError) as e:
                raise_if_environment(e)
                raise CheckpointError(f"{path}: unusable ({describe_error(e)})") from None
        self.last_saved_step = meta["step"]
        self.last_committed = info
        # The next commit chains to this one, if it is one of this run's (training.resume may name another run's
        # checkpoint: that run's chain is not this one's, so this run's starts afresh).
        link = read_link(info.path / COMMITTED)
        ours = info.path.resolve().parent == self.root.resolve()
        self.chain = (info.name, link) if link is not None and ours else None
        if link is None and self.rank == 0:
            log.warning(f"{info.name} predates the checkpoint digest chain: the chain starts afresh at the next "
                        f"commit")

    def _verify(self, info: CheckpointInfo, tensors: bool) -> None:
        """Check the checkpoint's files against CHECKSUMS.json: its JSON files (tensors=False) or DCP's files
        (tensors=True). Each rank checks every world-th file, and the ranks agree (the first failure, which names
        the file, is raised on every rank). A checkpoint saved before checksums existed is not checked. Off with
        verify=False."""
        if not self.verify:
            return
        error: str | None = None
        try:
            expected = read_checksums(info.path)
            if expected is None and not tensors:
                self._without_checksums(info)
            if expected is not None:
                world = dist.get_world_size(self.group) if not self.solo else 1
                rank = dist.get_rank(self.group) if not self.solo else 0
                names = sorted(n for n in expected if _is_dcp_file(n) == tensors)
                verify_files(info.path, expected, names[rank::world])
        except CheckpointError as e:
            error = str(e)
        if not self.solo:
            gathered: list = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(gathered, error, group=self.group)
            error = next((e for e in gathered if e), None)
        if error:
            raise CheckpointError(error)

    def _without_checksums(self, info: CheckpointInfo) -> None:
        """Only a checkpoint written before checksums existed may lack them; for any later one the file is missing
        (an incomplete copy, a tampered folder): damage."""
        written = written_format(info.path)
        if written == 0:
            raise CheckpointError(f"{info.path}: unreadable {META}")
        if written >= CHECKSUMS_SINCE_FORMAT:
            raise CheckpointError(f"{info.path}: no {CHECKSUMS} (every checkpoint of format {CHECKSUMS_SINCE_FORMAT} "
                                  f"or later has one; this one is format {written}: incomplete or altered)")
        self.unchecked = (f"checkpoint {info.name} predates checksums (format {written}): loaded without "
                          f"verifying its files")
        log.warning(self.unchecked)

    def _read_failure(self, info: CheckpointInfo, error: BaseException) -> BaseException:
        """What DCP's failure to read `info` was. An exception that does not say (a RuntimeError out of torch's
        deserialisation) is damage only where the checksums prove it; otherwise it is left to be the bug it is."""
        kind, why = classify(error), describe_error(error)
        if kind == ENVIRONMENT:
            return LoadUnavailable(f"{info.path}: cannot read the checkpoint ({why})")
        if kind == DAMAGE:
            return CheckpointError(f"{info.path}: cannot read the checkpoint ({why})")
        proof = self._checksum_proof(info)
        return CheckpointError(f"{proof} (reading it: {why})") if proof else error

    def _checksum_proof(self, info: CheckpointInfo) -> str | None:
        """This rank's check of every DCP file against CHECKSUMS: the mismatch, or None (verified, or nothing to
        verify against). Local, no collective: only the failure path runs it."""
        if not self.verify:
            return None
        try:
            expected = read_checksums(info.path)
            if expected is not None:
                verify_files(info.path, expected, [n for n in expected if _is_dcp_file(n)])
        except CheckpointError as e:
            return str(e)
        except OSError:
            return None
        return None

    def load_latest(self, candidates: list[CheckpointInfo]) -> tuple[CheckpointInfo, list[tuple[str, str]]]:
        """Load the newest candidate that every rank can load; (the one loaded, [(name, error) of the newer
        ones that failed]). A failed one is skipped, loudly, for the one before, and once an older one has
        loaded the failed ones are renamed to corrupt-NAME (kept for inspection, never loaded, never counted by
        retention) so that the run's new saves do not sit behind them. An incompatibility is not damage: it is
        raised at once. When none loads, the CheckpointError carries the failures as `.failures`."""
        failed: list[tuple[CheckpointInfo, str]] = []
        for info in reversed(candidates):
            error = None
            try:
                self.load(info)
            except (ConfigError, DataError):
                raise
            except DCP_ERRORS as e:  # agree across ranks before deciding
                error = e
            verdict = self._agree_class(classify(error))
            if verdict == 0:
                self._quarantine([f for f, _ in failed])
                return info, [(f.name, why) for f, why in failed]
            why = describe_error(error) if error is not None and not isinstance(error, CheckpointError) else \
                str(error) if error is not None else "failed to load on another rank"
            if verdict == ENVIRONMENT:
                raise LoadUnavailable(f"checkpoint {info.name} could not be read ({why}); it is left as it is, "
                                      f"and the next launch tries it again") from None
            if verdict == BUG:
                raise RuntimeError(f"loading checkpoint {info.name} failed ({why}); not damage (its files "
                                   f"verify), so it is left as it is") from error
            log.warning(f"checkpoint {info.name} failed to load ({why}); falling back to the one before")
            failed.append((info, why))
        err = CheckpointError(f"no checkpoint under {self.root} could be loaded "
                              f"(tried {', '.join(c.name for c in reversed(candidates))})")
        err.failures = [(f.name, why) for f, why in failed]
        raise err

    def _quarantine(self, failed: list[CheckpointInfo]) -> None:
        if self.rank == 0:
            for info in failed:
                target = info.path.with_name(f"{CORRUPT_PREFIX}{info.name}")
                if target.exists():
                    target = info.path.with_name(f"{CORRUPT_PREFIX}{info.name}-{int(time.time())}")
                try:
                    os.replace(info.path, target)  # a directory: the rename is the whole move
                    log.info(f"moved the checkpoint that failed to load to {target}")
                except OSError as e:
                    log.warning(f"could not move {info.path} aside ({e})")
        if dist.is_initialized():
            dist.barrier()
