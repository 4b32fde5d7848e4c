"""Streaming helpers shared by every generation path (torch, batched, llama.cpp)."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

import torch
from transformers import StoppingCriteria


def reply_chunks(chunks: Iterable[str]) -> Iterator[str]:
    """A streamer's text chunks as a reply: leading whitespace stripped, empty chunks dropped."""
    first = True
    for chunk in chunks:
        if first:
            chunk, first = chunk.lstrip(), False
        if chunk:
            yield chunk


class StopOnEvent(StoppingCriteria):
    """A stopping criterion that ends generation once `event` is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
