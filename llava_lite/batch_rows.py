"""The row layout of continuous batching: a decode batch whose rows have different lengths,
left-padded in one KV cache, and a prefill of several prompts in one forward.

Each row's real keys and values are a suffix of the time axis; the attention mask hides the
padding and every row keeps its own positions, as in `LlavaLite.ask_batch`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from llava_lite.llm import output_cache, with_cache

if TYPE_CHECKING:
    from llava_lite.continuous_batching import Generation


class DecodeBatch:
    """The running rows: their generations, one KV cache, the attention mask, each row's next
    position and last token."""

    def __init__(self) -> None:
        self.gens: list[Generation] = []
        self.cache: DynamicCache | None = None
        self.mask = self.pos = self.last = None

    def __len__(self) -> int:
        return len(self.gens)

    def join(self, gen: Generation, cache: DynamicCache, token: int, device) -> None:
        """Add a prefilled row: pad the shorter of (batch, row) on the left and stack them."""
        n = cache.get_seq_length()
        row_mask = torch.ones((1, n), dtype=torch.long, device=device)
        row_pos = torch.tensor([n], device=device)
        row_last = torch.tensor([token], device=device)
        if not self.gens:
            self.cache, self.mask, self.pos, self.last = cache, row_mask, row_pos, row_last
            self.gens = [gen]
            return
        width = max(n, self.mask.shape[1])
        layers = []
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            layers.append(tuple(torch.cat([pad_left(a, width), pad_left(b, width)])
                                for a, b in ((mine.keys, theirs.keys), (mine.values, theirs.values))))
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.mask = torch.cat([pad_left(self.mask, width), pad_left(row_mask, width)])
        self.pos = torch.cat([self.pos, row_pos])
        self.last = torch.cat([self.last, row_last])
        self.gens.append(gen)

    def row_cache(self, row: int) -> DynamicCache:
        """A copy of one row's keys and values, without its padding (for the prompt cache)."""
        n = int(self.mask[row].sum())
        return DynamicCache(ddp_cache_data=[
            (layer.keys[row:row + 1, :, -n:].clone(), layer.values[row:row + 1, :, -n:].clone())
            for layer in self.cache.layers])

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows`, then drop padding columns no row needs any more."""
        if not rows:
            self.__init__()
            return
        index = torch.tensor(rows, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.pos, self.last = self.mask[index], self.pos[index], self.last[index]
        self.gens = [self.gens[i] for i in rows]
        unused = int((self.mask.sum(0) == 0).long().cumprod(0).sum())
        if unused:
            self.mask = self.mask[:, unused:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]


def prefill_rows(lite, inputs: list[tuple]) -> tuple[torch.Tensor, list[DynamicCache]]:
    """One forward over several prompts, each (cached prefix or None, its length, new embeddings):
    the prefixes are left-padded to the longest, the new parts too, so a row reads
    [pad, prefix, pad, new] under its attention mask and its own positions. Returns the last
    position's logits per row and each row's cache without its padding."""
    device = lite.device
    R = max(reused for _, reused, _ in inputs)
    N = max(e.shape[1] for _, _, e in inputs)
    embeds = torch.cat([F.pad(e, (0, 0, N - e.shape[1], 0)) for _, _, e in inputs])
    mask = torch.zeros((len(inputs), R + N), dtype=torch.long, device=device)
    pos = torch.zeros((len(inputs), N), dtype=torch.long, device=device)
    for row, (_, reused, e) in enumerate(inputs):
        n = e.shape[1]
        mask[row, R - reused:R] = 1
        mask[row, R + N - n:] = 1
        pos[row, N - n:] = torch.arange(reused, reused + n, device=device)
    cache = DynamicCache(config=lite.model.llm.config)
    if R:
        layers = [c.layers if c is not None else None for c, _, _ in inputs]
        past = []
        for i, ref in enumerate(next(x for x in layers if x is not None)):
            keys, values = [], []
            for row_layers in layers:
                k = ref.keys[:, :, :0] if row_layers is None else row_layers[i].keys
                v = ref.values[:, :, :0] if row_layers is None else row_layers[i].values
                keys.append(pad_left(k, R))
                values.append(pad_left(v, R))
            past.append((torch.cat(keys), torch.cat(values)))
        cache = DynamicCache(ddp_cache_data=past)
    out = lite.model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True,
                         logits_to_keep=1, **with_cache(cache))
    full = output_cache(out)
    rows = []
    for row in range(len(inputs)):
        cols = mask[row].nonzero().flatten()
        rows.append(DynamicCache(ddp_cache_data=[(layer.keys[row:row + 1].index_select(2, cols),
                                                  layer.values[row:row + 1].index_select(2, cols))
                                                 for layer in full.layers]))
    return out.logits[:, -1], rows


def pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the time axis (dim 2 of keys/values, dim 1 of a mask) on the left to `width`."""
    missing = width - t.shape[-2 if t.dim() == 4 else -1]
    if missing == 0:
        return t
    return F.pad(t, (0, 0, missing, 0)) if t.dim() == 4 else F.pad(t, (missing, 0))
