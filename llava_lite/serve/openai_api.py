"""An OpenAI-compatible `POST /v1/chat/completions` (and `GET /v1/models`).

Images come as `image_url` content parts: `data:` URIs always; `file://` URLs only under
folders the server was started with (`--allow-local-files DIR`), checked after resolving
symlinks; remote URLs never (the server does not fetch on a client's behalf).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from llava_lite.serve.engine import ChatEngine, ChatRequest, GenerationStats, ServerBusyError, UserFacingError

SHUTDOWN_MESSAGE = "the server is shutting down; this reply was cut short"


class ImagePolicy:
    """Which `image_url`s a request may use."""

    def __init__(self, local_roots: list[str | Path] | None = None, max_bytes: int = 20 * 1024 * 1024) -> None:
        self.local_roots = [Path(os.path.realpath(r)) for r in (local_roots or [])]
        self.max_bytes = max_bytes

    def resolve(self, url: str) -> bytes | str:
        """Image bytes for a data: URI, or a checked local path for a file: URL."""
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if ";base64" not in header or not header[5:].startswith("image/"):
                raise UserFacingError("image_url data URIs must be base64 images (data:image/...;base64,...)")
            if len(payload) * 3 // 4 > self.max_bytes:
                raise UserFacingError(f"image_url: the image is over the {self.max_bytes}-byte limit")
            try:
                return base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as err:
                raise UserFacingError("image_url: the data URI is not valid base64") from err
        parsed = urlparse(url)
        if parsed.scheme == "file":
            if not self.local_roots:
                raise UserFacingError("image_url: local files are not allowed on this server")
            if parsed.netloc not in ("", "localhost"):
                raise UserFacingError("image_url: file URLs must name a local path")
            real = Path(os.path.realpath(unquote(parsed.path)))
            if not any(real.is_relative_to(root) for root in self.local_roots):
                raise UserFacingError("image_url: that path is outside the folders this server may read")
            return str(real)
        raise UserFacingError("image_url: only data: URIs (and allowed file: URLs) are accepted; "
                              "this server does not fetch remote URLs")


def parse_messages(raw: Any, image_token: str, policy: ImagePolicy) -> tuple[list[dict], list]:
    """OpenAI chat messages -> (model messages with image placeholders, images)."""
    if not isinstance(raw, list) or not raw:
        raise UserFacingError("'messages' must be a non-empty list")
    messages: list[dict] = []
    images: list = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            raise UserFacingError(f"messages[{i}]: needs a role of system, user or assistant")
        content = msg.get("content")
        if content is None:
            content = ""
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            texts, n_images = [], 0
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    texts.append(str(part.get("text", "")))
                elif kind == "image_url" and msg["role"] == "user":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str):
                        raise UserFacingError(f"messages[{i}].content[{j}]: image_url needs a url")
                    images.append(policy.resolve(url))
                    n_images += 1
                else:
                    raise UserFacingError(f"messages[{i}].content[{j}]: unsupported part type {kind!r}")
            text = f"{image_token}\n" * n_images + "\n".join(texts)
        else:
            raise UserFacingError(f"messages[{i}]: content must be a string or a list of parts")
        messages.append({"role": msg["role"], "content": text})
    return messages, images


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise UserFacingError(f"'{key}' must be a number in [{lo}, {hi}]")
    return float(value)


def build_router(engine: ChatEngine, policy: ImagePolicy) -> APIRouter:
    """FastAPI routes for the OpenAI-compatible API, on the same engine as the chat page."""
    router = APIRouter()
    model_id = "llava-lite"

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "code": None}}, status_code=status)

    @router.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "owned_by": "llava-lite",
                                            "created": 0, "description": engine.describe()}]}

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            return error(400, "the request body must be a JSON object")
        try:
            messages, images = parse_messages(body.get("messages"), engine.lite.config.image_token, policy)
            length_key = "max_completion_tokens" if body.get("max_completion_tokens") else "max_tokens"
            chat = ChatRequest(
                messages, images,
                temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
                top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1.0,
                max_new_tokens=int(_number({length_key: body.get(length_key) or 256}, length_key, 256, 1,
                                           1_000_000)),
            )
            if body.get("n", 1) != 1:
                raise UserFacingError("only n=1 is supported")
            stats = GenerationStats()
            request.state.generation = stats  # token counts and timings for the access log
            stream = engine.stream(chat, stats)
            # Run validation and wait for a slot now, so errors become HTTP errors, not
            # a broken stream.
            first = await _first_chunk(stream)
        except ServerBusyError as err:
            return error(503, str(err), "server_busy")
        except UserFacingError as err:
            return error(400, str(err))
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if body.get("stream"):
            return StreamingResponse(_sse(stream, first, stats, completion_id, created, model_id),
                                     media_type="text/event-stream")
        try:
            text = (first or "") + "".join(await _drain(stream))
        except UserFacingError as err:
            return error(500, str(err), "server_error")
        if stats.finish_reason == "cancelled":
            return error(503, SHUTDOWN_MESSAGE, "unavailable")
        return _completion(completion_id, created, model_id, text, stats)

    return router


def _completion(completion_id: str, created: int, model_id: str, text: str, stats: GenerationStats) -> dict:
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": _finish(stats)}],
        "usage": {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
                  "total_tokens": stats.prompt_tokens + stats.completion_tokens},
    }


def _finish(stats: GenerationStats) -> str:
    return "length" if stats.finish_reason in ("length", "timeout") else "stop"


async def _first_chunk(stream) -> str | None:
    return await run_in_threadpool(next, stream, None)


async def _drain(stream) -> list[str]:
    return await run_in_threadpool(list, stream)


def _sse(stream, first: str | None, stats: GenerationStats, completion_id: str, created: int, model_id: str):
    """Server-sent events in OpenAI's chunk format (a sync generator: Starlette runs it in
    a worker thread)."""

    def event(delta: dict, finish: str | None = None) -> str:
        chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(chunk)}\n\n"

    yield event({"role": "assistant", "content": ""})
    try:
        if first:
            yield event({"content": first})
        for chunk in stream:
            yield event({"content": chunk})
    except UserFacingError as err:
        yield f"data: {json.dumps({'error': {'message': str(err), 'type': 'server_error'}})}\n\n"
        return
    finally:
        stream.close()
    if stats.finish_reason == "cancelled":
        yield f"data: {json.dumps({'error': {'message': SHUTDOWN_MESSAGE, 'type': 'unavailable'}})}\n\n"
        yield "data: [DONE]\n\n"
        return
    yield event({}, _finish(stats))
    yield "data: [DONE]\n\n"
