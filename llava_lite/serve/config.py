"""Everything `llava-lite serve` can be told, in one dataclass that a TOML or YAML file fills.

    llava-lite serve --config serve.toml --port 8000     # flags override the file

Loaded, type-checked and overridden like every other config (`llava_lite.settings`):
unknown keys and wrong types are errors that name the file and the key.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from llava_lite.config import LLAMACPP_MODES, ConfigError
from llava_lite.serve.limits import ServeLimits
from llava_lite.settings import Settings

# what the server can run: torch none/8bit/4bit, or the llama.cpp decoder (needs llama-cpp-python)
SERVE_QUANTIZE = ("none", "8bit", "4bit", "int8-w8a8-prefill", "int8-weight-only", *LLAMACPP_MODES)

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
class ServeConfig(Settings):
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
