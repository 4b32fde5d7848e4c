"""Deterministic, length-grouped global batches: the data position of a run is its step."""

from __future__ import annotations

import random
from collections.abc import Sequence


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool,
                  mega: int = 32) -> list[list[int]]:
    """The global batches of one epoch, a pure function of (seed, epoch).

    With `group_by_length`, shuffled indices are cut into mega-batches of `mega` batches and
    sorted by length inside each, so a batch holds similar lengths (less padding) while the
    order stays random. The last incomplete batch is dropped so every step has the same size.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        span = batch_size * mega
        grouped = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start:start + span], key=lambda i: lengths[i], reverse=True)
            grouped.extend(chunk)
        order = grouped
    batches = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


class BatchSchedule:
    """Maps a global step to its batch, across epochs."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool) -> None:
        if len(lengths) < batch_size:
            raise ValueError(f"only {len(lengths)} samples for a batch of {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.steps_per_epoch = len(lengths) // batch_size
        self._epoch = -1
        self._batches: list[list[int]] = []

    def batch(self, step: int) -> list[int]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._batches = epoch_batches(self.lengths, self.batch_size, self.seed, epoch, self.group_by_length)
            self._epoch = epoch
        return self._batches[pos]


def shard(batch: list[int], rank: int, world: int) -> list[int]:
    """This process's contiguous slice of a global batch."""
    per = len(batch) // world
    return batch[rank * per:(rank + 1) * per]
