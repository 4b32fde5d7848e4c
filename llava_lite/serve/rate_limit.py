"""Per-client budgets: requests per minute (a token bucket) and generations in flight.

A client is an API key (by its id) or, on a server without keys, a remote address. Being
over budget is answered with 429 and a `Retry-After` that says when the next request fits.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from llava_lite.serve.config import RateLimitConfig


@dataclass
class Refusal:
    reason: str
    retry_after_s: int


class _Bucket:
    def __init__(self, capacity: float, now: float) -> None:
        self.tokens = capacity
        self.stamp = now


class RateLimiter:
    """Thread-safe; `clock` is injectable so tests need not sleep."""

    def __init__(self, config: RateLimitConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.config.requests_per_minute or self.config.concurrent)

    def admit(self, client: str, generation: bool) -> Refusal | None:
        """Take one request from `client`'s budget, or say why not. A `generation` that is
        admitted holds a concurrency slot until `release(client)`."""
        with self._lock:
            if generation and self.config.concurrent and self._in_flight.get(client, 0) >= self.config.concurrent:
                return Refusal(f"at most {self.config.concurrent} generation(s) at once per client", 1)
            refusal = self._take(client)
            if refusal is None and generation:
                self._in_flight[client] = self._in_flight.get(client, 0) + 1
            return refusal

    def release(self, client: str) -> None:
        with self._lock:
            left = self._in_flight.get(client, 0) - 1
            if left > 0:
                self._in_flight[client] = left
            else:
                self._in_flight.pop(client, None)

    def _take(self, client: str) -> Refusal | None:
        rpm = self.config.requests_per_minute
        if not rpm:
            return None
        now = self.clock()
        bucket = self._buckets.setdefault(client, _Bucket(rpm, now))
        rate = rpm / 60.0  # tokens per second
        bucket.tokens = min(rpm, bucket.tokens + (now - bucket.stamp) * rate)
        bucket.stamp = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return None
        return Refusal(f"over {rpm} requests per minute", max(1, math.ceil((1 - bucket.tokens) / rate)))
