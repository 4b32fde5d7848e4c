"""Continuous batching: live conversations decode together, one forward pass per token.

A decode step of a small LLM on a CPU is bound by reading the weights, not by arithmetic, so
a step over eight conversations costs little more than a step over one. One worker thread
owns the model. Conversations arrive prepared (`LlavaLite.prepare`: images through the tower,
prompt tokenized, in the caller's thread). The conversations waiting at a step are prefilled
together in one forward (each reusing a cached prefix from `LlavaLite.prompt_cache` when it
continues an earlier one) and join the running batch at the next step; a finished one leaves
at once. No conversation waits for another to finish.

The batch's KV cache is left-padded: each row's real keys and values are a suffix of the time
axis, the attention mask hides the padding and every row keeps its own positions, as in
`LlavaLite.ask_batch`. Greedy rows take the argmax; sampled rows go through transformers'
temperature and top-p warpers.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence

import torch
from transformers import DynamicCache, TemperatureLogitsWarper, TextIteratorStreamer, TopPLogitsWarper

from llava_lite.batch_rows import DecodeBatch, prefill_rows
from llava_lite.image_views import PreparedPrompt
from llava_lite.llm import output_cache, with_cache
from llava_lite.streaming import reply_chunks

log = logging.getLogger("llava_lite.batching")


class Generation:
    """One conversation's reply inside a `ContinuousBatcher`. Iterate it for the text chunks;
    `close()` stops it at the next token (a Stop button, a closed connection)."""

    def __init__(self, tokenizer, prompt: PreparedPrompt, max_new_tokens: int,
                 temperature: float, top_p: float, timeout_s: float) -> None:
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.submitted = time.monotonic()
        self.deadline = self.submitted + timeout_s
        self.streamer = TextIteratorStreamer(tokenizer, skip_special_tokens=True)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None  # "stop", "length", "timeout", "cancelled" or "error"
        self.error: BaseException | None = None
        self._closed = threading.Event()
        self._done = threading.Event()

    def __iter__(self) -> Iterator[str]:
        yield from reply_chunks(self.streamer)
        self._done.wait()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Stop at the next token and wait until the generation has ended."""
        self._closed.set()
        self._done.wait()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the generation has ended by itself; False on `timeout`."""
        return self._done.wait(timeout)

    def _end(self, reason: str, error: BaseException | None = None) -> None:
        self.finish_reason, self.error = reason, error
        self.streamer.end()
        self._done.set()


class ContinuousBatcher:
    """Runs many generations on one `LlavaLite` as one decode batch of up to `max_batch` rows.

    `cancel_all`, when set, ends every live generation at its next token ("cancelled"). The
    worker thread starts with the first submission and ends when there is nothing to do.
    """

    def __init__(self, lite, max_batch: int = 8, cancel_all: threading.Event | None = None,
                 prefill_group: int = 1, prefill_wait_s: float = 0.0) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if prefill_group < 1 or prefill_wait_s < 0:
            raise ValueError(f"prefill_group must be at least 1 and prefill_wait_s at least 0, got "
                             f"{prefill_group} and {prefill_wait_s}")
        self.lite = lite
        self.max_batch = max_batch
        self.prefill_group, self.prefill_wait_s = prefill_group, prefill_wait_s
        self.cancel_all = cancel_all or threading.Event()
        self._pending: list[Generation] = []
        self._admitting: list[Generation] = []
        self._batch = DecodeBatch()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self.steps = 0  # decode steps run, and rows they carried: their ratio is the mean batch
        self.rows_stepped = 0
        self.prefills = 0  # prefill forwards, the requests they carried and their new tokens
        self.prefilled_rows = 0
        self.prefilled_tokens = 0
        eos = lite.processor.tokenizer.eos_token_id
        self._eos = set(eos) if isinstance(eos, (list, tuple)) else {eos}

    @property
    def active(self) -> int:
        """Generations admitted or waiting for admission and not yet finished."""
        with self._lock:
            return len(self._pending) + len(self._batch)

    def submit(self, prompt: PreparedPrompt, *, max_new_tokens: int = 128, temperature: float = 0.0,
               top_p: float = 1.0, timeout_s: float = math.inf) -> Generation:
        """Queue a prepared conversation (`LlavaLite.prepare`) for a reply; returns its
        `Generation` at once."""
        gen = Generation(self.lite.processor.tokenizer, prompt, max_new_tokens, temperature, top_p, timeout_s)
        with self._lock:
            self._pending.append(gen)
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="llava-lite-batcher", daemon=True)
                self._worker.start()
        return gen

    # -- the worker ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.no_grad():
                while self._round():
                    pass
        except BaseException as err:  # a bug here must not leave readers waiting forever
            log.exception("batch worker failed")
            with self._lock:
                for gen in self._pending + self._admitting + self._batch.gens:
                    if gen.finish_reason is None:
                        gen._end("error", err)
                self._pending, self._admitting, self._worker = [], [], None
                self._batch.keep([])

    def _round(self) -> bool:
        """Admit what fits, run one decode step; False (and the worker ends) when idle."""
        with self._lock:
            if not self._pending and not self._batch.gens:
                self._worker = None
                return False
            room = self.max_batch - len(self._batch)
            if not self._admit_now(room):
                room = 0
            admit, self._pending = self._pending[:room], self._pending[room:]
            self._admitting = admit  # neither pending nor in the batch: a crash must still end them
        self._admit_many(admit)
        with self._lock:
            self._admitting = []
        if self._batch.gens:
            self._step()
        return True

    def _admit_now(self, room: int) -> bool:
        """Whether waiting requests are admitted at this step. While others decode, a request
        may wait up to `prefill_wait_s` for company, so that `prefill_group` of them share one
        prefill: alone, a prefill pays its weight casts and row padding for one request. With
        nothing decoding, waiting would only delay it."""
        if not self._batch.gens or not self._pending:
            return True
        return (len(self._pending) >= min(self.prefill_group, room)
                or time.monotonic() - self._pending[0].submitted >= self.prefill_wait_s)

    def _admit_many(self, gens: list[Generation]) -> None:
        """Prefill the admitted conversations in one forward pass, emit each first token and join
        the batch. A lone 90-token prefill of the 8-bit default model cost twice as much per
        request as four together (its row padding and weight casts are paid once per forward).
        If the shared forward fails, each is retried alone, so a bad request fails only itself."""
        ready = []
        for gen in gens:
            try:
                if reason := self._stop_reason(gen):
                    gen._end(reason)
                    continue
                ready.append((gen, self._prefill_inputs(gen)))
            except Exception as err:  # this request's failure only
                log.exception("prefill failed")
                gen._end("error", err)
        if len(ready) < 2:
            for gen, inputs in ready:
                self._admit(gen, inputs)
            return
        try:
            logits, caches = prefill_rows(self.lite, [inputs for _, inputs in ready])
            tokens = self._sample([gen for gen, _ in ready], logits)
        except Exception:  # noqa: BLE001 - one request's input may break the shared pass: retry alone
            log.warning("batched prefill failed; prefilling one at a time", exc_info=True)
            for gen, inputs in ready:
                self._admit(gen, inputs)
            return
        self._count_prefill(len(ready), sum(inputs[2].shape[1] for _, inputs in ready))
        for (gen, _), token, cache in zip(ready, tokens, caches, strict=True):
            self._start(gen, token, cache)

    def _count_prefill(self, rows: int, tokens: int) -> None:
        """One prefill forward pass of `rows` requests and `tokens` new prompt tokens."""
        self.prefills += 1
        self.prefilled_rows += rows
        self.prefilled_tokens += tokens

    def _prefill_inputs(self, gen: Generation) -> tuple:
        """(cached prefix or None, its length, the embeddings of the rest) of one prompt."""
        lite, prompt = self.lite, gen.prompt
        cache, reused = lite.prompt_cache.take(prompt.ids, prompt.keys)
        input_ids = torch.tensor([prompt.ids], device=lite.device)
        return cache, reused, lite.model.embed(input_ids, prompt.embeds)[:, reused:]

    def _admit(self, gen: Generation, inputs: tuple | None = None) -> None:
        """Prefill one conversation, emit its first token and, unless done, add it to the batch."""
        try:
            if reason := self._stop_reason(gen):
                gen._end(reason)
                return
            token, state = self._prefill(gen, inputs)
        except Exception as err:  # this request's failure only; the batch goes on
            log.exception("prefill failed")
            gen._end("error", err)
            return
        self._start(gen, token, state)

    def _start(self, gen: Generation, token: int, state) -> None:
        """Emit a prefilled conversation's first token; unless that ends it, add it to the batch."""
        with self._lock:
            if not self._emit(gen, token):
                self._join(gen, state, token)
            else:
                self._done_at_prefill(gen, state)

    def _prefill(self, gen: Generation, inputs: tuple | None = None):
        """(first token, the row's KV cache), reusing a cached prefix of the prompt."""
        lite = self.lite
        inputs = inputs or self._prefill_inputs(gen)
        cache, _, embeds = inputs
        if cache is None:
            cache = DynamicCache(config=lite.model.llm.config)
        out = lite.model.llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1, **with_cache(cache))
        self._count_prefill(1, embeds.shape[1])
        return self._sample([gen], out.logits[:, -1])[0], output_cache(out)

    def _join(self, gen: Generation, cache, token: int) -> None:
        self._batch.join(gen, cache, token, self.lite.device)

    def _done_at_prefill(self, gen: Generation, cache) -> None:
        self.lite.prompt_cache.put(gen.prompt.ids + gen.tokens, gen.prompt.keys, cache)

    def _step(self) -> None:
        batch = self._batch
        try:
            mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)
            out = self.lite.model.llm(input_ids=batch.last[:, None], attention_mask=mask,
                                      position_ids=batch.pos[:, None], use_cache=True,
                                      **with_cache(batch.cache))
            tokens = self._sample(batch.gens, out.logits[:, -1])
        except Exception as err:  # a failed step fails every row in it
            self._fail_step(err)
            return
        self.steps += 1
        self.rows_stepped += len(batch)
        with self._lock:
            batch.cache, batch.mask = output_cache(out), mask
            batch.pos = batch.pos + 1
            batch.last = torch.tensor(tokens, device=batch.last.device)
            live = []
            for row, (gen, token) in enumerate(zip(batch.gens, tokens, strict=True)):
                if self._emit(gen, token):
                    self.lite.prompt_cache.put(gen.prompt.ids + gen.tokens, gen.prompt.keys, batch.row_cache(row))
                else:
                    live.append(row)
            if len(live) < len(batch):
                batch.keep(live)

    def _fail_step(self, err: Exception) -> None:
        log.exception("decode step failed")
        with self._lock:
            for gen in self._batch.gens:
                gen._end("error", err)
            self._batch.keep([])

    def _sample(self, gens: Sequence[Generation], logits: torch.Tensor) -> list[int]:
        tokens = logits.argmax(-1).tolist()
        for row, gen in enumerate(gens):
            if gen.temperature > 0:
                scores = TemperatureLogitsWarper(max(gen.temperature, 1e-5))(None, logits[row:row + 1].float())
                if gen.top_p < 1.0:
                    scores = TopPLogitsWarper(gen.top_p)(None, scores)
                tokens[row] = int(torch.multinomial(scores.softmax(-1), 1))
        return tokens

    def _emit(self, gen: Generation, token: int) -> bool:
        """Stream `token` to its generation; True when that generation has finished."""
        gen.tokens.append(token)
        gen.streamer.put(torch.tensor([token]))
        reason = "stop" if token in self._eos else self._stop_reason(gen)
        if reason is None and len(gen.tokens) >= gen.max_new_tokens:
            reason = "length"
        if reason is not None:
            gen._end(reason)
            return True
        return False

    def _stop_reason(self, gen: Generation) -> str | None:
        if self.cancel_all.is_set():
            return "cancelled"
        if gen._closed.is_set():
            return "stop"  # the reader went away: stopping is what it asked for
        if time.monotonic() >= gen.deadline:
            return "timeout"
        return None
