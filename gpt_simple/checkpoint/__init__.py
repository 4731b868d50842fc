"""Checkpoints: what one is on disk and how it is read safely (files), and the manager that saves, commits,
retains and loads them (manager). See docs/checkpointing.md."""
from gpt_simple.checkpoint.files import (COMMITTED, CORRUPT_PREFIX, DCP_ERRORS, META, NAME_RE, ArchitectureMismatch,
                                         CheckpointError, CheckpointInfo, SafeFileSystemReader, SafeLoadPlanner,
                                         check_architecture, committed_info, describe_error, list_committed, load_model_state,
                                         model_config_from_meta, read_dcp_metadata, read_meta,
                                         resume_candidates)
from gpt_simple.checkpoint.manager import SAVE_DELAY_ENV, STAGE_DELAY_ENV, CheckpointManager, tied_aliases

__all__ = ["COMMITTED", "CORRUPT_PREFIX", "DCP_ERRORS", "META", "NAME_RE", "SAVE_DELAY_ENV", "STAGE_DELAY_ENV",
           "ArchitectureMismatch", "CheckpointError", "CheckpointInfo", "CheckpointManager", "SafeFileSystemReader",
           "SafeLoadPlanner", "check_architecture", "committed_info", "describe_error", "list_committed", "load_model_state",
           "model_config_from_meta", "read_dcp_metadata", "read_meta", "resume_candidates", "tied_aliases"]
