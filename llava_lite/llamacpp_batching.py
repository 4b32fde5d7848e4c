"""Continuous batching on the llama.cpp decoder: each live conversation owns a KV slot, and one
llama_decode per step advances every slot by a token.

Same contract as `ContinuousBatcher` (whose admission, sampling, streaming and stop rules it
reuses): no conversation waits for another to finish, limits and Stop hold per row. A new
conversation takes the free slot whose cached positions share the longest prefix with its
prompt, so a follow-up turn prefills only what is new.
"""

from __future__ import annotations

import threading

from llava_lite.continuous_batching import ContinuousBatcher, Generation
from llava_lite.llamacpp_chat import prompt_inputs
from llava_lite.llamacpp_decoder import LlamaCppDecoder


class _Rows:
    """The live generations, their slots and their last tokens."""

    def __init__(self) -> None:
        self.gens: list[Generation] = []
        self.slots: list[int] = []
        self.last: list[int] = []

    def __len__(self) -> int:
        return len(self.gens)

    def join(self, gen: Generation, slot: int, token: int) -> None:
        self.gens.append(gen)
        self.slots.append(slot)
        self.last.append(token)

    def keep(self, rows: list[int]) -> None:
        self.gens = [self.gens[r] for r in rows]
        self.slots = [self.slots[r] for r in rows]
        self.last = [self.last[r] for r in rows]


class LlamaCppBatcher(ContinuousBatcher):
    """`ContinuousBatcher` with llama.cpp doing the forward passes, `max_batch` slots wide."""

    def __init__(self, lite, max_batch: int = 8, cancel_all: threading.Event | None = None,
                 exact_kv: bool = False) -> None:
        super().__init__(lite, max_batch=max_batch, cancel_all=cancel_all)
        old = lite.decoder
        # One KV slot per row. f16 keys and values (llama.cpp's default) keep 8 slots of 2,048
        # positions to ~380 MB for SmolLM2-135M; `exact_kv` (f32) is for comparing with torch.
        lite.decoder = LlamaCppDecoder(old.gguf_path, old.n_ctx, slots=max_batch, exact_kv=exact_kv)
        old.close()
        self.decoder = lite.decoder
        self._batch = _Rows()

    def _admit_many(self, gens: list[Generation]) -> None:
        for gen in gens:  # each prefill fills its own KV slot
            self._admit(gen)

    def _free_slot(self, keys: list) -> int:
        busy = set(self._batch.slots)
        free = [s for s in range(self.max_batch) if s not in busy]
        return max(free, key=lambda s: self.decoder.shared_prefix(s, keys))

    def _prefill(self, gen: Generation, inputs: tuple | None = None):
        """(first token, the slot it now holds)."""
        prompt, pos = prompt_inputs(self.lite, gen.prompt.ids, gen.prompt.embeds, gen.prompt.keys)
        with self._lock:
            slot = self._free_slot(pos)
        with self.decoder._lock:
            logits = self.decoder.prefill(slot, prompt, pos)
            self._count_prefill(1, self.decoder.last_prefill)
        return self._sample([gen], logits[None])[0], slot

    def _join(self, gen: Generation, slot: int, token: int) -> None:
        self._batch.join(gen, slot, token)

    def _done_at_prefill(self, gen: Generation, slot: int) -> None:
        pass  # the slot keeps its positions for a follow-up; nothing to hand back

    def _step(self) -> None:
        rows = self._batch
        try:
            with self.decoder._lock:
                logits = self.decoder.step(list(zip(rows.slots, rows.last, strict=True)))
            tokens = self._sample(rows.gens, logits)
        except Exception as err:  # a failed step fails every row in it
            self._fail_step(err)
            return
        self.steps += 1
        self.rows_stepped += len(rows)
        with self._lock:
            live = []
            for row, (gen, token) in enumerate(zip(rows.gens, tokens, strict=True)):
                if not self._emit(gen, token):
                    if self.decoder.room(rows.slots[row]) > 1:
                        rows.last[row] = token
                        live.append(row)
                    else:
                        gen._end("length")
            if len(live) < len(rows):
                rows.keep(live)
