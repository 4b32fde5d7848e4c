"""Everything `llava-lite serve` can be told, in one dataclass that a TOML or YAML file fills.

    llava-lite serve --config serve.toml --port 8000     # flags override the file

Unknown keys and wrong types are errors that name the file and the key, like the model and
recipe configs (`llava_lite.config`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from llava_lite.config import LLAMACPP_MODES, ConfigError
from llava_lite.serve.limits import ServeLimits

# what the server can run: torch none/8bit/4bit, or the llama.cpp decoder (needs llama-cpp-python)
SERVE_QUANTIZE = ("none", "8bit", "4bit", *LLAMACPP_MODES)

@dataclass
class AuthConfig:
    """Who may use the server. API keys guard `/v1/*` (`Authorization: Bearer KEY`); users
    (`name:password`) guard the chat page. Files hold one key or one user per line."""

    api_keys: list[str] = field(default_factory=list)
    api_key_file: str | None = None
    users: list[str] = field(default_factory=list)
    users_file: str | None = None
    no_auth: bool = False  # serve a non-loopback address without any of the above, on purpose


@dataclass
class RateLimitConfig:
    """Per API key, or per client address when the server has no keys; 0 turns a limit off."""

    requests_per_minute: int = 0
    concurrent: int = 0  # chat completions in flight at once


@dataclass
class ServeConfig:
    model: str | None = None
    quantize: str = "8bit"
    device: str | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    allow_local_files: list[str] = field(default_factory=list)
    shutdown_grace_s: float = 30.0  # on SIGTERM, in-flight generations get this long to finish
    limits: ServeLimits = field(default_factory=ServeLimits)
    auth: AuthConfig = field(default_factory=AuthConfig)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)

    def validate(self) -> ServeConfig:
        if self.quantize not in SERVE_QUANTIZE:
            raise ConfigError(f"quantize={self.quantize!r}; use one of {', '.join(SERVE_QUANTIZE)}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port={self.port} is not a TCP port")
        if self.shutdown_grace_s < 0:
            raise ConfigError("shutdown_grace_s must be >= 0")
        if self.rate_limit.requests_per_minute < 0 or self.rate_limit.concurrent < 0:
            raise ConfigError("rate_limit values must be >= 0 (0 = no limit)")
        for user in self.auth.users:
            if ":" not in user or not user.split(":", 1)[0] or not user.split(":", 1)[1]:
                raise ConfigError("auth.users entries are name:password")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<serve config>") -> ServeConfig:
        return _build(cls, data, source).validate()

    @classmethod
    def load(cls, path: str | Path) -> ServeConfig:
        return cls.from_dict(read_config_file(path), source=str(path))


SECTIONS = {"limits": ServeLimits, "auth": AuthConfig, "rate_limit": RateLimitConfig}


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table of settings, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    defaults = cls()
    for key, value in data.items():
        if cls is ServeConfig and key in SECTIONS:
            kwargs[key] = _build(SECTIONS[key], value, f"{where}: {key}")
        else:
            kwargs[key] = _typed(value, getattr(defaults, key), f"{where}: {key}")
    try:
        return cls(**kwargs)
    except ValueError as err:  # ServeLimits checks its own values
        raise ConfigError(f"{where}: {err}") from err


def _typed(value: Any, default: Any, where: str) -> Any:
    """`value` checked against the type of the field's default (ints pass for floats)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{where}: expected {type(default).__name__}, got {value!r}")
    return value


def read_config_file(path: str | Path) -> Any:
    """A TOML (.toml) or YAML (.yaml/.yml) file's contents, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: serve config file not found")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib

            return tomllib.loads(text)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text) or {}
    except Exception as err:  # tomllib.TOMLDecodeError, yaml.YAMLError
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()} ({err})") from err
    raise ConfigError(f"{path}: use a .toml, .yaml or .yml file")


def read_lines(path: str | Path, what: str) -> list[str]:
    """Non-empty, non-comment lines of a key or user file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
