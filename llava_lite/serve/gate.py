"""What every HTTP request passes through: a request id, the API key check and rate limits on
`/v1/*`, refusal while the server drains for shutdown, metrics, and one access-log line.

A pure ASGI middleware, so a streamed reply is timed to its last byte and its rate-limit slot
is held until then. The access log carries ids, route, status, timings and token counts, never
prompts, images or keys (a key appears only as its hash, `auth.key_id`).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass

from llava_lite.serve.auth import ApiKeys
from llava_lite.serve.metrics import ServerMetrics
from llava_lite.serve.rate_limit import RateLimiter

access_log = logging.getLogger("llava_lite.access")
API_PREFIX = "/v1/"
GENERATION_ROUTES = ("/v1/chat/completions",)
# New work refused while draining: the API and the chat page's queue (its page and assets stay up).
DRAINED_PREFIXES = (API_PREFIX, "/gradio_api/queue/join", "/gradio_api/call/")


@dataclass
class GateState:
    """What the gate reads and the server changes (draining starts on SIGTERM)."""

    keys: ApiKeys
    limiter: RateLimiter
    metrics: ServerMetrics | None = None
    draining: bool = False


def _error_body(message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": None}}).encode()


class Gate:
    def __init__(self, app, state: GateState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        request_id = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        record = {"request_id": request_id, "method": scope.get("method"), "route": path, "status": 500}
        start = time.perf_counter()
        client, generation = None, False

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                record["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            refusal = self._refuse(scope, path)
            if refusal is not None:
                status, body, headers = refusal
                await _respond(send_wrapped, status, body, headers)
                return
            if path.startswith(API_PREFIX):
                client, generation = self._client(scope), path in GENERATION_ROUTES
                record["client"] = client
                limited = self.state.limiter.admit(client, generation)
                if limited is not None:
                    generation = False  # no slot was taken
                    await _respond(send_wrapped, 429, _error_body(f"rate limit: {limited.reason}", "rate_limited"),
                                   [(b"retry-after", str(limited.retry_after_s).encode())])
                    return
            await self.app(scope, receive, send_wrapped)
        finally:
            if generation:
                self.state.limiter.release(client)
            self._record(scope, path, record, time.perf_counter() - start)

    def _refuse(self, scope, path: str):
        """(status, body, headers) for a request refused before it reaches the app."""
        if self.state.draining and path.startswith(DRAINED_PREFIXES):
            return 503, _error_body("the server is shutting down", "unavailable"), [(b"retry-after", b"5")]
        if path.startswith(API_PREFIX) and self.state.keys:
            key = self.state.keys.check(_header(scope, b"authorization"))
            if key is None:
                return 401, _error_body("a valid API key is required: Authorization: Bearer KEY",
                                        "invalid_api_key"), [(b"www-authenticate", b"Bearer")]
            scope["state"]["key_id"] = key
        return None

    def _client(self, scope) -> str:
        key = scope["state"].get("key_id")
        if key:
            return f"key:{key}"
        host = (scope.get("client") or ("unknown", 0))[0]
        return f"addr:{host}"

    def _record(self, scope, path: str, record: dict, seconds: float) -> None:
        record["duration_ms"] = round(seconds * 1000, 1)
        stats = scope["state"].get("generation")
        if stats is not None:
            record.update(prompt_tokens=stats.prompt_tokens, completion_tokens=stats.completion_tokens,
                          finish=stats.finish_reason,
                          ttft_ms=None if stats.first_token_s is None else round(stats.first_token_s * 1000, 1))
        if self.state.metrics is not None:
            self.state.metrics.observe_request(path, record["status"], seconds)
        if not path.startswith(("/assets/", "/static/", "/gradio_api/file=")):
            access_log.info(json.dumps(record))


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _respond(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})
