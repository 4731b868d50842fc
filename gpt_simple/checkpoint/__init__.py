"""Checkpoints: what one is on disk and how it is read safely (files), and the manager that saves, commits,
retains and loads the run's Stateful parts (manager, composed of saver, loader and retention). What a checkpoint
holds is defined by the dict of parts the trainer hands the manager (gpt_simple/state.py). See
docs/checkpointing.md."""
from gpt_simple.checkpoint.files import (CHECKSUMS, COMMITTED, CORRUPT_PREFIX, DCP_ERRORS, META, NAME_RE,
                                         CheckpointError, CheckpointInfo, ChecksumMismatch, SafeFileSystemReader,
                                         SafeLoadPlanner, committed_info, describe_error, list_committed,
                                         load_model_state, meta_tokenizer, model_config_from_meta, read_checksums,
                                         read_dcp_metadata, read_meta, resume_candidates, verify_checkpoint)
from gpt_simple.checkpoint.manager import CheckpointManager

__all__ = ["CHECKSUMS", "COMMITTED", "CORRUPT_PREFIX", "DCP_ERRORS", "META", "NAME_RE", "CheckpointError",
           "CheckpointInfo", "CheckpointManager", "ChecksumMismatch", "SafeFileSystemReader", "SafeLoadPlanner",
           "committed_info", "describe_error", "list_committed", "load_model_state", "meta_tokenizer",
           "model_config_from_meta", "read_checksums", "read_dcp_metadata", "read_meta", "resume_candidates",
           "verify_checkpoint"]
