"""Reuse of a conversation's KV cache from one turn to the next.

A chat resends its whole history every turn. The previous turn's cache already holds keys
and values for most of it, so only the new tokens need a forward pass: the second turn's
first token then costs about as much as its new text, not the whole conversation.

A cached prefix is reused only as far as the images in it are the same images, since image
placeholders are the same token ids whatever the picture.

Different conversations share a head too: the system prompt and the template's opening (24
tokens of the default model's 88-token first turn). A prompt that needs only part of a
cached entry gets a copy of that part, and the entry stays for its own conversation, so a new
chat starts from the shared head without taking another user's follow-up cache away.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import DynamicCache


@dataclass
class _Entry:
    tokens: list[int]
    image_keys: tuple[str, ...]
    cache: Any  # a transformers Cache holding exactly `tokens`


def common_prefix_len(*seqs: Sequence[int]) -> int:
    """Length of the longest prefix all the sequences share."""
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return n


def _image_runs(tokens: Sequence[int], image_token_id: int) -> list[int]:
    """Start index of each run of image tokens (one run per image)."""
    starts = []
    for i, t in enumerate(tokens):
        if t == image_token_id and (i == 0 or tokens[i - 1] != image_token_id):
            starts.append(i)
    return starts


def copy_prefix(cache: DynamicCache, n: int) -> DynamicCache:
    """A new cache holding copies of the first `n` positions of `cache`'s keys and values."""
    return DynamicCache(ddp_cache_data=[(layer.keys[..., :n, :].clone(), layer.values[..., :n, :].clone())
                                        for layer in cache.layers])


class PromptCache:
    """A small LRU of KV caches keyed by token sequence and image identity."""

    def __init__(self, image_token_id: int, capacity: int = 4, min_reuse: int = 8,
                 copy: Callable[[Any, int], Any] = copy_prefix) -> None:
        self.image_token_id = image_token_id
        self.copy = copy
        self.capacity = capacity
        self.min_reuse = min_reuse
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()
        self.reused_tokens = 0
        self.hits = 0
        self.misses = 0

    def _usable(self, entry: _Entry, tokens: Sequence[int], image_keys: Sequence[str]) -> int:
        n = common_prefix_len(entry.tokens, tokens)
        starts = _image_runs(entry.tokens, self.image_token_id)
        for k, start in enumerate(starts):
            if start >= n:
                break
            if k >= len(image_keys) or k >= len(entry.image_keys) or entry.image_keys[k] != image_keys[k]:
                n = start  # a different picture behind the same placeholder tokens
                break
        return min(n, len(tokens) - 1)  # at least one token must go through the model

    def take(self, tokens: Sequence[int], image_keys: Sequence[str]) -> tuple[Any, int]:
        """(a cache of the longest usable prefix, its length), or (None, 0). An entry used whole
        leaves the pool: a cache is extended in place, so two generations never share one. An
        entry used in part (another conversation's shared head, or an earlier branch of this
        one) stays, and the caller gets a copy of the part."""
        if self.capacity <= 0:
            return None, 0
        with self._lock:
            best_id, best_n = None, 0
            for entry_id, entry in self._entries.items():
                n = self._usable(entry, tokens, image_keys)
                if n > best_n:
                    best_id, best_n = entry_id, n
            if best_id is None or best_n < self.min_reuse:
                self.misses += 1
                return None, 0
            self.hits += 1
            self.reused_tokens += best_n
            entry = self._entries[best_id]
            if best_n < len(entry.tokens):
                self._entries.move_to_end(best_id)  # a shared head stays recent while chats start from it
                return self.copy(entry.cache, best_n), best_n
            del self._entries[best_id]
        return entry.cache, best_n

    def put(self, tokens: Sequence[int], image_keys: Sequence[str], cache: Any) -> None:
        if self.capacity <= 0 or cache is None:
            return
        length = cache.get_seq_length()
        if length <= 0 or length > len(tokens):
            return
        with self._lock:
            self._entries[self._next] = _Entry(list(tokens[:length]), tuple(image_keys), cache)
            self._next += 1
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
