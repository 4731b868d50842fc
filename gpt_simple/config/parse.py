"""Reading a config: TOML (or YAML, with PyYAML) files and `--section.field value` overrides, type coercion with
one-line errors, and writing it back (to_toml, the markdown reference of docs/configuration.md)."""
from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from gpt_simple.config.errors import ConfigError, suggest
from gpt_simple.config.schema import Config, field_types, section_classes, validate

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _type_name(typ) -> str:
    return " or ".join(t.__name__ for t in typing.get_args(typ)) if isinstance(typ, types.UnionType) else typ.__name__


def _coerce(where: str, value: Any, typ: type) -> Any:
    """Check one TOML value against the field's type; ints are accepted for floats."""
    if isinstance(typ, types.UnionType):  # e.g. int | str: the first that fits
        for option in typing.get_args(typ):
            try:
                return _coerce(where, value, option)
            except ConfigError:
                pass
        shown = json.dumps(value) if not isinstance(value, str) else repr(value)
        raise ConfigError(f"{where}: expected {_type_name(typ)}, got {type(value).__name__} {shown}")
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    elif typ is list:
        if isinstance(value, list):
            return value
    elif typ is dict:
        if isinstance(value, dict):
            return value
    shown = json.dumps(value) if not isinstance(value, str) else repr(value)
    raise ConfigError(f"{where}: expected {typ.__name__}, got {type(value).__name__} {shown}")


def _apply(cfg: Config, raw: dict, origin: str) -> None:
    classes = section_classes()
    for section, values in raw.items():
        if section not in classes:
            raise ConfigError(f"{origin}: unknown section [{section}]{suggest(section, classes)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: [{section}] must be a table")
        types = field_types(classes[section])
        target = getattr(cfg, section)
        for name, value in values.items():
            if name not in types:
                raise ConfigError(f"{origin}: unknown field {section}.{name}{suggest(name, types)}")
            setattr(target, name, _coerce(f"{origin}: {section}.{name}", value, types[name]))


def parse_override_value(text: str) -> Any:
    """A command-line value is read as a TOML value (numbers, booleans, lists, inline tables), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(args: list[str]) -> dict:
    """['--training.max_steps', '500', '--data.audit=true'] -> {'training': {'max_steps': 500}, 'data': {...}}."""
    raw: dict[str, dict] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"command line: expected --section.field value, got {arg!r}")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise ConfigError(f"command line: --{key} needs a value")
            value = args[i + 1]
            i += 1
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = parse_override_value(value)
        i += 1
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    """Defaults, then `base` (a run's recorded config: fields this version does not know are left out), then
    the file, then the command-line overrides."""
    cfg = Config()
    if base:
        known = {section: {k: v for k, v in values.items() if k in field_types(cls)}
                 for section, cls in section_classes().items() if isinstance(values := base.get(section), dict)}
        _apply(cfg, known, "the checkpoint's recorded config")
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
        raw = _parse_yaml(path, text) if path.suffix in (".yaml", ".yml") else _parse_toml(path, text)
        _apply(cfg, raw, str(path))
    if overrides:
        _apply(cfg, parse_overrides(overrides), "command line")
    validate(cfg)
    return cfg


def _parse_toml(path: Path, text: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def _parse_yaml(path: Path, text: str) -> dict:
    """The same sections and fields as TOML, for sites whose tooling writes YAML (needs PyYAML)."""
    try:
        import yaml
    except ImportError:
        raise ConfigError(f"{path}: a YAML config needs PyYAML (pip install pyyaml), or use TOML") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(raw).__name__}")
    return raw


def diff(old: dict, new: dict, prefix: str = "") -> dict[str, tuple]:
    """Fields whose values differ between two config dicts: {'optimizer.lr': (old, new)}."""
    out = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict) and prefix == "":
            out.update(diff(a, b, f"{key}."))
        elif a != b:
            out[name] = (a, b)
    return out


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (read back by load_config)."""
    import tomli_w
    return tomli_w.dumps(cfg.to_dict())


def _toml_value(value: Any) -> str:
    """One value as TOML, for the reference table."""
    import tomli_w
    if value == {}:
        return "{}"  # tomli_w writes an empty table as a [v] header
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def markdown_reference() -> str:
    """docs/configuration.md: every field with its type, default and doc."""
    out = ["# Configuration reference", "",
           "Generated by `python -m gpt_simple.config --markdown > docs/configuration.md`; do not edit by hand.",
           "Every field can be set in the TOML file (a `.yaml`/`.yml` file with the same sections works too, with PyYAML)",
           "or on the command line as `--section.field value`",
           "(values are read as TOML: `--data.allow_bucket_exhaustion true`, `--data.curriculum '[{tokens = 1000, mix = {a = 1}}]'`).",
           ""]
    for section, cls in section_classes().items():
        out += [f"## [{section}]", "", "| field | type | default | meaning |", "| --- | --- | --- | --- |"]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append(f"| `{f.name}` | {_type_name(field_types(cls)[f.name])} | `{_toml_value(default)}` | "
                       f"{f.metadata['doc']} |")
        out.append("")
    return "\n".join(out)
