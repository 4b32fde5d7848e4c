"""The generation engine behind every front end (browser, HTTP API, terminal).

It turns a request into model input under the server's limits, bounds how many
generations run at once, stops runaway generations and turns every failure a user can
cause into a `UserFacingError` with a readable message. The generations running at once
decode together as one batch (`llava_lite.continuous_batching`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llava_lite import LlavaLite
from llava_lite.continuous_batching import ContinuousBatcher, Generation
from llava_lite.image_views import ImageView, PreparedPrompt
from llava_lite.images import ImageInput, ImageLoadError
from llava_lite.processor import ImageLimits, ImageSourceError
from llava_lite.prompting import ConversationError, SequenceTooLongError
from llava_lite.serve.limits import ServeLimits

log = logging.getLogger("llava_lite.serve")


class UserFacingError(Exception):
    """A request the server refuses; the message is safe and useful to show the user."""


class ServerBusyError(UserFacingError):
    pass


@dataclass
class ChatRequest:
    """A conversation in the model's message format (image placeholders in the text) and
    its images in placeholder order."""

    messages: list[dict]
    images: list[ImageInput] = field(default_factory=list)
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float | None = None
    total_s: float = 0.0
    finish_reason: str = "stop"  # "stop", "length", "timeout", "cancelled" (server shutdown) or "error"
    image_views: list[ImageView] = field(default_factory=list)  # the request's images after the tower


class ChatEngine:
    """Runs chat requests on one shared model under `ServeLimits`."""

    def __init__(self, lite: LlavaLite, limits: ServeLimits | None = None) -> None:
        self.lite = lite
        self.limits = limits or ServeLimits()
        self._slots = threading.BoundedSemaphore(self.limits.concurrency)
        self._waiting = 0
        self._active = 0
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        # One decode batch for every live conversation, as wide as the generations allowed at once.
        if lite.decoder is not None:  # quantize="llamacpp-*": llama.cpp slots instead of a torch batch
            from llava_lite.llamacpp_batching import LlamaCppBatcher

            self.batcher = LlamaCppBatcher(lite, max_batch=self.limits.concurrency, cancel_all=self._cancel)
        else:
            self.batcher = ContinuousBatcher(lite, max_batch=self.limits.concurrency, cancel_all=self._cancel,
                                             prefill_group=self.limits.prefill_group,
                                             prefill_wait_s=self.limits.prefill_wait_s)
        # called with each finished generation's stats (metrics); must not raise
        self.on_finish: list[Callable[[GenerationStats], None]] = []

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def in_flight(self) -> int:
        return self._active

    def counters(self) -> dict[str, tuple[str, float]]:
        """Prefill and prompt-cache counts for /metrics: passes / requests is the mean number
        of requests prefilled together; reused / (reused + prefilled) tokens is the share of
        prompt tokens the prompt cache saved."""
        b, cache = self.batcher, self.lite.prompt_cache
        return {
            "llava_lite_prefill_passes": ("prefill forward passes", b.prefills),
            "llava_lite_prefill_requests": ("requests prefilled (several can share a pass)", b.prefilled_rows),
            "llava_lite_prefill_tokens": ("prompt tokens run through the model in prefills", b.prefilled_tokens),
            "llava_lite_prompt_cache_hits": ("prompts that reused cached keys and values", cache.hits),
            "llava_lite_prompt_cache_reused_tokens": ("prompt tokens taken from the prompt cache",
                                                      cache.reused_tokens),
        }

    def warm_up(self) -> None:
        """One short text-only generation before the first user: the first forward pays
        one-time costs (thread pools, kernel choice), and the system prompt's keys and values
        stay in the prompt cache for every new chat to start from (the default 8-bit model's
        first token, new image: ~30% less than with nothing cached)."""
        gen = self.batcher.submit(self.lite.prepare([{"role": "user", "content": "Hello"}]), max_new_tokens=1)
        gen.wait()
        if gen.error is not None:
            raise gen.error

    def cancel_all(self) -> None:
        """Stop every running generation at its next token (server shutdown); they end with
        finish_reason "cancelled". New generations are not affected."""
        self._cancel.set()

    @property
    def model_name(self) -> str:
        return self.lite.source or "llava-lite"

    def describe(self) -> str:
        return f"model `{self.model_name}` · quantization `{self.lite.quantization}`"

    # -- validation ----------------------------------------------------------------
    def _check(self, request: ChatRequest) -> tuple[PreparedPrompt, int]:
        user_turns = [m for m in request.messages if m.get("role") == "user"]
        if not user_turns or not str(user_turns[-1].get("content", "")).replace(
                self.lite.config.image_token, "").strip():
            raise UserFacingError("Please type a message.")
        for msg in request.messages:
            if msg.get("role") == "user" and len(str(msg.get("content", ""))) > self.limits.max_message_chars:
                raise UserFacingError(
                    f"That message is {len(msg['content'])} characters; the limit is "
                    f"{self.limits.max_message_chars}."
                )
        if len(request.images) > self.limits.max_images:
            raise UserFacingError(
                f"This conversation has {len(request.images)} images; the server accepts at most "
                f"{self.limits.max_images}. Clear the chat to start again."
            )
        max_new = max(1, min(int(request.max_new_tokens), self.limits.max_new_tokens))
        limits = ImageLimits(max_pixels=self.limits.max_image_pixels, max_file_bytes=self.limits.max_upload_bytes)
        try:
            prompt = self.lite.prepare(request.messages, request.images, max_new_tokens=1, limits=limits)
        except ImageSourceError as err:
            raise UserFacingError(_hide_dirs(str(err), err.source)) from err
        except SequenceTooLongError as err:
            raise UserFacingError(
                f"The conversation is too long for the model's context of {self.lite.config.max_length} "
                "tokens (images included). Clear the chat or shorten the message.") from err
        except (ConversationError, ImageLoadError) as err:
            raise UserFacingError(str(err)) from err
        except Exception as err:  # the tower or tokenizer failing on odd input: the server goes on
            log.exception("preparing a request failed")
            raise UserFacingError("Sorry, something went wrong while reading this request; the error was "
                                  "logged on the server.") from err
        # A reply shortened to fit the context beats refusing a prompt that fits.
        return prompt, min(max_new, self.lite.config.max_length - len(prompt.ids))

    # -- generation ----------------------------------------------------------------
    def stream(self, request: ChatRequest, stats: GenerationStats | None = None) -> Iterator[str]:
        """Yield the reply's text chunks; raises UserFacingError for refused requests."""
        stats = stats if stats is not None else GenerationStats()
        prompt, max_new = self._check(request)
        stats.prompt_tokens, stats.image_views = len(prompt.ids), prompt.views
        self._acquire()
        start = time.perf_counter()
        gen = self.batcher.submit(
            prompt, max_new_tokens=max_new, temperature=float(request.temperature),
            top_p=float(request.top_p), timeout_s=self.limits.generation_timeout_s)
        try:
            for chunk in gen:
                if stats.first_token_s is None:
                    stats.first_token_s = time.perf_counter() - start
                yield chunk
        except Exception as err:
            log.error("generation failed: %r", err)
            raise UserFacingError("Sorry, something went wrong while generating; the error was "
                                  "logged on the server.") from err
        finally:
            gen.close()  # a reader that stopped early (Stop button, closed connection) ends it here
            self._finish(stats, gen, start)

    def _finish(self, stats: GenerationStats, gen: Generation, start: float) -> None:
        with self._lock:
            self._active -= 1
        self._slots.release()
        stats.total_s = time.perf_counter() - start
        stats.completion_tokens = len(gen.tokens)
        stats.finish_reason = gen.finish_reason or "stop"
        for callback in self.on_finish:
            try:
                callback(stats)
            except Exception:  # a metrics hook must never break a reply
                log.exception("on_finish callback failed")

    def complete(self, request: ChatRequest) -> tuple[str, GenerationStats]:
        stats = GenerationStats()
        text = "".join(self.stream(request, stats))
        return text, stats

    def _acquire(self) -> None:
        with self._lock:
            if self._waiting >= self.limits.queue_size:
                raise ServerBusyError("The server is busy; please try again in a moment.")
            self._waiting += 1
        try:
            if not self._slots.acquire(timeout=self.limits.queue_timeout_s):
                raise ServerBusyError("The server is busy; please try again in a moment.")
        finally:
            with self._lock:
                self._waiting -= 1
        with self._lock:
            self._active += 1


def _hide_dirs(message: str, source: ImageInput) -> str:
    """Name an uploaded file by its file name only: server-side folders are not the user's
    business."""
    if isinstance(source, (str, Path)):
        full = str(source)
        return message.replace(full, Path(full).name)
    return message
