"""API keys and chat-page users, and the rule about exposed addresses.

Keys are compared in constant time against every configured key, and are known elsewhere
(rate limits, access logs) only by a short hash, so no log line ever holds one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from llava_lite.config import ConfigError
from llava_lite.serve.config import AuthConfig, is_loopback, read_lines

API_KEY_ENV = "LLAVA_LITE_API_KEY"


def key_id(key: str) -> str:
    """A name for a key that is safe to log: the first 8 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


class ApiKeys:
    """The keys `/v1/*` accepts; empty means the API is open."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in dict.fromkeys(keys) if k]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> str | None:
        """The key id for a valid `Bearer KEY` header, else None. Every key is compared, each
        with `hmac.compare_digest`, so the time taken does not tell which bytes matched."""
        scheme, _, given = (authorization or "").partition(" ")
        given_bytes = given.strip().encode()
        match = None
        for key in self._keys:
            if hmac.compare_digest(key, given_bytes) and scheme.lower() == "bearer":
                match = key
        return key_id(match.decode()) if match is not None else None


@dataclass
class Access:
    """Resolved access settings: API keys, chat-page users, and a warning to print, if any."""

    keys: ApiKeys
    users: list[tuple[str, str]]
    warning: str | None = None


def resolve_access(auth: AuthConfig, host: str, share: bool) -> Access:
    """Keys from the config, the key file and $LLAVA_LITE_API_KEY; users from the config and the
    users file. Serving beyond this machine with neither is refused unless `no_auth` is set."""
    keys = list(auth.api_keys)
    if auth.api_key_file:
        keys += read_lines(auth.api_key_file, "API key")
    if os.environ.get(API_KEY_ENV):
        keys.append(os.environ[API_KEY_ENV])
    entries = list(auth.users) + (read_lines(auth.users_file, "users") if auth.users_file else [])
    users = []
    for entry in entries:
        name, sep, password = entry.partition(":")
        if not sep or not name or not password:
            raise ConfigError("each user is name:password (one per line in a users file)")
        users.append((name, password))
    access = Access(ApiKeys(keys), users)
    exposed = share or not is_loopback(host)
    if not exposed:
        return access
    where = "a public share link" if share else f"{host}"
    if not access.keys and not users:
        if not auth.no_auth:
            raise ConfigError(
                f"refusing to serve {where} with no authentication: anyone who can reach it could use the "
                f"model. Give --api-key KEY (or ${API_KEY_ENV}, --api-key-file) and --auth USER:PASSWORD "
                "(or --auth-file), or pass --no-auth to serve it open on purpose.")
        access.warning = (f"WARNING: serving {where} with no authentication (--no-auth): "
                          "anyone who can reach it can use it")
    elif not access.keys:
        access.warning = f"WARNING: {where}: the chat page needs a login but /v1/* is open (no --api-key)"
    elif not users:
        access.warning = f"WARNING: {where}: /v1/* needs an API key but the chat page is open (no --auth)"
    return access
