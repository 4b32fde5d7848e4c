"""One config system for every config dataclass: the model config, the training and CLIP
recipes, the dual encoder and the server (with its limits).

- One loader: JSON, TOML or YAML by the file's suffix.
- One validation style: pydantic checks each value's type and refuses unknown keys against
  the dataclass fields (strictly: no "8" for 8, no 1 for true), then the class's own
  `validate()` checks what the values mean.
- One override syntax: `a.b.c=value` (list items by index, `align.data.0.path=...`), the value
  parsed as JSON unless the field holds text, then validated like a file.

Every error is a `ConfigError` that names the source (file, "overrides") and the dotted key.
"""

from __future__ import annotations

import json
import typing
from dataclasses import asdict, fields, is_dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or value is invalid."""


class Settings:
    """What every config dataclass shares: dict and file round trips, overrides, validation."""

    # read by pydantic (a ConfigDict); it carries over to the nested dataclasses
    __pydantic_config__: typing.ClassVar[dict[str, Any]] = {"extra": "forbid"}

    def validate(self):
        """Check what the values mean (types are already checked); return self."""
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[T], data: Any, source: str = "<dict>") -> T:
        return build(cls, data, source)

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        return build(cls, read_config_file(path), str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def with_overrides(self: T, overrides: list[str]) -> T:
        return apply_overrides(self, overrides)


@cache
def _adapter(cls: type):
    from pydantic import TypeAdapter

    return TypeAdapter(cls)


def build(cls: type[T], data: Any, source: str) -> T:
    """`cls` from plain data (a file's contents), type-checked, then `validate()`d."""
    from pydantic import ValidationError

    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a table of settings, got {type(data).__name__}")
    try:
        # JSON mode, because pydantic's strict Python mode wants dataclass instances, not dicts
        obj = _adapter(cls).validate_json(json.dumps(data), strict=True)
    except ValidationError as err:
        raise ConfigError(_describe(cls, err.errors()[0], source)) from None
    except TypeError as err:  # a value JSON cannot hold (a Python object in a dict)
        raise ConfigError(f"{source}: {err}") from None
    return obj.validate() if hasattr(obj, "validate") else obj


def _describe(cls: type, error: dict[str, Any], source: str) -> str:
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc)
    if error["type"] == "unexpected_keyword_argument":
        known = _known_keys(cls, loc[:-1])
        return f"{source}: unknown key {key!r}; known keys: {known}"
    if error["type"] == "value_error":  # raised by the dataclass itself (__post_init__)
        return f"{source}: {key + ': ' if key else ''}{error['msg'].removeprefix('Value error, ')}"
    msg = error["msg"].lower().replace("valid array", "valid list")  # JSON's word, not the user's
    return f"{source}: {key}: {msg} (got {error.get('input')!r})"


def _known_keys(cls: type, path: list[str]) -> list[str]:
    """The field names of the dataclass at `path` inside `cls` (list indices skipped)."""
    for part in path:
        if part.isdigit():
            continue
        hint = typing.get_type_hints(cls).get(part)
        cls = next((a for a in (hint, *typing.get_args(hint)) if is_dataclass(a)), None)
        if cls is None:
            return []
    return sorted(f.name for f in fields(cls))


def read_config_file(path: str | Path) -> Any:
    """A JSON, TOML or YAML file's contents, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            return json.loads(text)
        if path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib

            return tomllib.loads(text)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text) or {}
    except Exception as err:  # json.JSONDecodeError, tomllib.TOMLDecodeError, yaml.YAMLError
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()} ({err})") from err
    raise ConfigError(f"{path}: use a .json, .toml, .yaml or .yml file")


def apply_overrides(obj: T, overrides: list[str]) -> T:
    """`obj` with `a.b.c=value` overrides applied, validated like a config file."""
    data = obj.to_dict()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        node: Any = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = _child(node, part, key)
        current = _child(node, parts[-1], key)  # the field must exist
        value = raw if isinstance(current, str) else _parse_value(raw)
        node[int(parts[-1]) if isinstance(node, list) else parts[-1]] = value
    return build(type(obj), data, "overrides")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string, e.g. a path for a field that is None now


def _child(node: Any, part: str, key: str) -> Any:
    """`part` of a dict, or item `part` (an index) of a list."""
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    if isinstance(node, dict) and part in node:
        return node[part]
    raise ConfigError(f"override {key!r}: no such field {part!r}")
