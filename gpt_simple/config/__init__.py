"""Typed run configuration: TOML file (or YAML, with PyYAML) + `--section.field value` overrides, validated at load.

Every field has a default and a one-line doc (`doc(...)`); docs/configuration.md is generated from them
by `python -m gpt_simple.config --markdown`, and a test fails when the committed file is stale.

schema.py holds the sections, their fields and docs, and the checks of a loaded config; parse.py reads files and
overrides into it (and writes it back: to_toml, the markdown reference); errors.py holds ConfigError.
"""
from gpt_simple.config.errors import ConfigError
from gpt_simple.config.parse import (diff, load_config, markdown_reference, parse_override_value, parse_overrides,
                                     to_toml)
from gpt_simple.config.schema import (Config, DataConfig, EvalConfig, ModelConfig, OptimizerConfig, ParallelConfig,
                                      TrainingConfig, WandbConfig, doc, validate, validate_world)

__all__ = ["Config", "ConfigError", "DataConfig", "EvalConfig", "ModelConfig", "OptimizerConfig", "ParallelConfig",
           "TrainingConfig", "WandbConfig", "diff", "doc", "load_config", "markdown_reference", "parse_override_value",
           "parse_overrides", "to_toml", "validate", "validate_world"]
