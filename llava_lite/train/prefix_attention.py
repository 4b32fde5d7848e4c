"""Attention for prefix-shared packs without a dense mask.

A pack (`llava_lite.train.packing`) is a shared prefix followed by many short suffixes, each of
which sees the prefix and itself only. As one dense masked attention over the whole pack, most
of the (length x length) scores are computed and then masked away, and the masked CPU kernel is
slow. Here every token scores only its row's prefix and, in a suffix, its own suffix, under one
softmax (`_packs_attention`); unpacked rows take causal SDPA. The outputs equal the block-mask
attention's at every real token.

It plugs into transformers as a registered attention function. Inside `prefix_attention(llm)`
the LLM uses it whenever a forward is given `pack_layout=PackLayout(...)`, and plain SDPA
otherwise, so generation and unpacked rows are unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

NAME = "llava_lite_prefix"
PAD = -1  # segment id of right padding


@dataclass
class _Index:
    singles: torch.Tensor  # rows with no suffix: plain causal attention
    packs: torch.Tensor  # rows with suffixes
    order: torch.Tensor  # puts cat([singles, packs]) back in batch order
    packed: _PackIndex | None


@dataclass
class _SpanGroup:
    """Suffixes of similar length, each padded to the group's longest (S) in (suffix, slot) order."""

    seg_len: int  # S
    seg_tokens: torch.Tensor  # (N * S,) flat token index of each slot (clamped where padded)
    local_keys: torch.Tensor  # (N, 1, 1, S, S): causal within the suffix, real keys only
    stem_tokens: torch.Tensor | None  # (N * T,) flat token index of each suffix's stem keys; None: no stems
    stem_keys: torch.Tensor | None  # (N, 1, 1, 1, T): which of those are real (none for a suffix without one)

    @property
    def count(self) -> int:
        return self.seg_tokens.numel() // self.seg_len

    @property
    def key_width(self) -> int:
        return self.seg_len + (0 if self.stem_keys is None else self.stem_keys.shape[-1])


@dataclass
class _PackIndex:
    width: int  # P: the longest prefix (segment 0) in the batch
    prefix_keys: torch.Tensor  # (B, 1, 1, L, P): which prefix key each token sees
    groups: list[_SpanGroup]  # the suffixes, split by length so that few slots are padding
    token_slot: torch.Tensor  # (B * L,) each token's slot among the groups' slots in turn, or their total (none)


class PackLayout:
    """Per token of a right-padded batch: 0 for the shared prefix (or an unpacked row), k >= 1
    for the k-th suffix, -1 for padding; and per row and segment the stem segment it continues
    (`parents[b, k]`, 0 for none). Indexes along the batch like a tensor.

    A plain class, not a dataclass: FSDP2's mixed precision casts a forward's inputs by
    rebuilding every dataclass it finds, which would hand each layer a copy (its own `calls`
    and index) instead of this one object.
    """

    def __init__(self, segments: torch.Tensor, parents: torch.Tensor | None = None) -> None:
        self.segments = segments  # (B, L) long
        self.parents = parents  # (B, K + 1) long, or None: no stems
        self.calls = 0  # attention layers that used this layout (0 after a forward: it was ignored)
        self._index: _Index | None = None

    def __getitem__(self, rows: torch.Tensor) -> PackLayout:
        return PackLayout(self.segments[rows], None if self.parents is None else self.parents[rows])

    def index(self, device: torch.device) -> _Index:
        if self._index is None:  # built once per micro-batch, shared by every layer
            parents = None if self.parents is None else self.parents.to(device)
            self._index = _build_index(self.segments.to(device), parents)
        return self._index


def layout_of(segments: list[list[int]], width: int, parents: list[list[int]] | None = None) -> PackLayout:
    """The layout of right-padded packs; `parents[b][k - 1]` is the stem suffix k of row b continues."""
    seg = torch.full((len(segments), width), PAD, dtype=torch.long)
    for b, s in enumerate(segments):
        seg[b, :len(s)] = torch.tensor(s, dtype=torch.long)
    if not parents or not any(any(p) for p in parents):
        return PackLayout(seg)
    table = torch.zeros((len(segments), max(len(p) for p in parents) + 1), dtype=torch.long)
    for b, p in enumerate(parents):
        table[b, 1:len(p) + 1] = torch.tensor(p, dtype=torch.long)
    return PackLayout(seg, table)


def _suffix_spans(seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, start, length) of every suffix segment in the batch."""
    change = torch.ones_like(seg, dtype=torch.bool)
    change[:, 1:] = seg[:, 1:] != seg[:, :-1]
    rows, starts = (change & (seg > 0)).nonzero(as_tuple=True)
    last = torch.ones_like(change)
    last[:, :-1] = change[:, 1:]
    _, ends = (last & (seg > 0)).nonzero(as_tuple=True)
    return rows, starts, ends - starts + 1


def _build_index(seg: torch.Tensor, parents: torch.Tensor | None) -> _Index:
    is_pack = (seg > 0).any(1)
    singles, packs = (~is_pack).nonzero().flatten(), is_pack.nonzero().flatten()
    order = torch.cat([singles, packs]).argsort()
    packed = None
    if len(packs):
        packed = _build_pack_index(seg[packs], None if parents is None else parents[packs])
    return _Index(singles, packs, order, packed)


def _stem_spans(seg: torch.Tensor, parents: torch.Tensor | None, rows: torch.Tensor, starts: torch.Tensor,
                lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each suffix span, the start and length of the stem it continues (length 0: none)."""
    N = len(rows)
    if parents is None or not N:
        return starts.new_zeros(N), starts.new_zeros(N)
    ids = seg[rows, starts]
    span_of = torch.full_like(parents, N)
    span_of[rows, ids] = torch.arange(N, device=seg.device)
    stem = span_of[rows, parents[rows, ids]]  # a parent 0 (none) finds N: no span is segment 0
    pad = starts.new_zeros(1)
    return torch.cat([starts, pad])[stem], torch.cat([lengths, pad])[stem]


def _split_by_length(lengths: torch.Tensor) -> list[torch.Tensor]:
    """The spans in one or two groups, at the length cut that pads the fewest (slot x key) pairs: a
    few long suffixes (captions) would otherwise pad every short one to their length. A second
    group costs kernels of its own, so it must save at least a quarter of those pairs."""
    order = lengths.argsort()
    ls = lengths[order].tolist()
    n = len(ls)
    best, cut = 0.75 * n * ls[-1] ** 2, n
    for i in range(1, n):
        cost = i * ls[i - 1] ** 2 + (n - i) * ls[-1] ** 2
        if ls[i] != ls[i - 1] and cost < best:
            best, cut = cost, i
    return [order[:cut], order[cut:]] if cut < n else [order]


def _span_group(rows: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, stem_starts: torch.Tensor,
                stem_lengths: torch.Tensor, L: int) -> tuple[_SpanGroup, torch.Tensor]:
    """The group, and which of its (N * S) slots hold a real token."""
    S = max(int(lengths.max()), 1)
    r = torch.arange(S, device=rows.device)
    valid = r[None, :] < lengths[:, None]
    seg_tokens = rows[:, None] * L + starts[:, None] + torch.minimum(r[None, :], (lengths - 1)[:, None])
    local_keys = (r[None, :] <= r[:, None])[None] & valid[:, None, :]
    stem_tokens = stem_keys = None
    T = int(stem_lengths.max())
    if T:  # stems are short: their key block is as wide as the longest, not S
        t = torch.arange(T, device=rows.device)
        last = (stem_lengths - 1).clamp(min=0)
        stem_tokens = (rows[:, None] * L + stem_starts[:, None] + torch.minimum(t[None, :], last[:, None])).reshape(-1)
        stem_keys = (t[None, :] < stem_lengths[:, None])[:, None, None, None, :]
    return _SpanGroup(S, seg_tokens.reshape(-1), local_keys[:, None, None], stem_tokens, stem_keys), valid.reshape(-1)


def _build_pack_index(seg: torch.Tensor, parents: torch.Tensor | None) -> _PackIndex:
    B, L = seg.shape
    pos = torch.arange(L, device=seg.device)
    prefix_len = (seg == 0).sum(1)
    if bool(((seg == 0) != (pos < prefix_len[:, None])).any()):
        raise ValueError("pack layout: each row's segment 0 must be one run at its start")
    P = max(int(prefix_len.max()), 1)
    i = pos[:P]
    # a prefix token sees the prefix causally; suffix (and padding) tokens see all of it
    causal = i[None, None, :] <= pos[None, :, None]
    prefix_keys = (i[None, None, :] < prefix_len[:, None, None]) & ((seg[:, :, None] != 0) | causal)
    rows, starts, lengths = _suffix_spans(seg)
    stem_starts, stem_lengths = _stem_spans(seg, parents, rows, starts, lengths)
    groups, base = [], 0
    token_slot = torch.empty(B * L, dtype=torch.long, device=seg.device)
    for idx in _split_by_length(lengths) if len(lengths) else []:
        g, real = _span_group(rows[idx], starts[idx], lengths[idx], stem_starts[idx], stem_lengths[idx], L)
        token_slot[g.seg_tokens[real]] = base + real.nonzero().flatten()
        groups.append(g)
        base += g.seg_tokens.numel()
    token_slot[(seg <= 0).reshape(-1)] = base  # prefix and padding: the masked row after every slot
    return _PackIndex(P, prefix_keys[:, None, None], groups, token_slot)


def _token_major(x: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, G, L, X) -> (B * L, Hkv, G, X)"""
    B, Hkv, G, L, X = x.shape
    return x.permute(0, 3, 1, 2, 4).reshape(B * L, Hkv, G, X)


def _slot_major(x: torch.Tensor, n: int, s: int) -> torch.Tensor:
    """(N * S, Hkv, G, X) -> (N, Hkv, G, S, X)"""
    return x.view(n, s, *x.shape[1:]).permute(0, 2, 3, 1, 4)


# Kept out of torch.compile (train/compiled_layers.py): its index tensors have data-dependent shapes.
@torch.compiler.disable
def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: PackLayout,
                     scaling: float | None = None, dropout: float = 0.0) -> torch.Tensor:
    """(B, H, L, D) query, (B, Hkv, L, D) key/value -> (B, L, H, D), as the block-mask attention
    gives at every real token. Unpacked rows take plain causal SDPA, packs `_packs_attention`."""
    ix = layout.index(query.device)
    layout.calls += 1
    mixed = len(ix.singles) and ix.packed is not None

    def rows(x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        return x.index_select(0, which) if mixed else x

    parts = []
    if len(ix.singles):
        q, k, v = (rows(x, ix.singles) for x in (query, key, value))
        groups = query.shape[1] // key.shape[1]
        if groups > 1:
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        parts.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                    scale=scaling).transpose(1, 2))
    if ix.packed is not None:
        q, k, v = (rows(x, ix.packs) for x in (query, key, value))
        parts.append(_packs_attention(q, k, v, ix.packed, scaling, dropout))
    if not mixed:
        return parts[0]
    return torch.cat([x.to(parts[-1].dtype) for x in parts]).index_select(0, ix.order)


def _packs_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ix: _PackIndex,
                     scaling: float | None, dropout: float) -> torch.Tensor:
    """Every token scores the (longest) prefix in its row, and a suffix token also the keys of its
    own suffix (and of its stem), gathered into (suffix, slot) order; one softmax over these sets
    of scores gives exactly the masked attention's weights, at P + S (+ T) scores per token
    instead of L.
    """
    B, H, L, D = query.shape
    Hkv = key.shape[1]
    G = H // Hkv
    P = ix.width
    scale = D ** -0.5 if scaling is None else scaling
    q = query.view(B, Hkv, G, L, D)
    scores = torch.matmul(q, key[:, :, None, :P].transpose(-1, -2)) * scale  # (B, Hkv, G, L, P)
    scores = _token_major(scores.masked_fill(~ix.prefix_keys, float("-inf")))
    tokens = [x.permute(0, 2, 1, 3).reshape(B * L, Hkv, 1, D) for x in (key, value)]
    if ix.groups:
        K = max(g.key_width for g in ix.groups)
        q_tok = _token_major(q)
        local = [_group_scores(q_tok, tokens[0], g, scale, K) for g in ix.groups]
        local.append(local[0].new_full((1, Hkv, G, K), float("-inf")))
        scores = torch.cat([scores, torch.cat(local).index_select(0, ix.token_slot)], dim=-1)
    probs = F.dropout(scores.float().softmax(-1), dropout, training=dropout > 0).to(value.dtype)
    pp = probs[..., :P].view(B, L, Hkv, G, P).permute(0, 2, 3, 1, 4)
    out = torch.matmul(pp, value[:, :, None, :P]).permute(0, 3, 1, 2, 4).reshape(B * L, H, D)
    if ix.groups:
        local_out = [_group_values(probs[..., P:], tokens[1], g) for g in ix.groups]
        local_out.append(local_out[0].new_zeros(1, H, D))
        out = out + torch.cat(local_out).index_select(0, ix.token_slot)
    return out.view(B, L, H, D)


def _group_keys(tok: torch.Tensor, g: _SpanGroup) -> torch.Tensor:
    """(B * L, Hkv, 1, D) token-major keys or values -> the group's (N, Hkv, 1, T + S, D): each
    suffix's stem keys (if the group has stems), then its own."""
    own = _slot_major(tok.index_select(0, g.seg_tokens), g.count, g.seg_len)
    if g.stem_tokens is None:
        return own
    stem = _slot_major(tok.index_select(0, g.stem_tokens), g.count, g.stem_keys.shape[-1])
    return torch.cat([stem, own], dim=-2)


def _group_scores(q_tok: torch.Tensor, k_tok: torch.Tensor, g: _SpanGroup, scale: float, width: int) -> torch.Tensor:
    """The group's slot scores (N * S, Hkv, G, width), -inf past its own key width and at masked keys."""
    N, S = g.count, g.seg_len
    qs = _slot_major(q_tok.index_select(0, g.seg_tokens), N, S)
    keys = g.local_keys
    if g.stem_keys is not None:
        keys = torch.cat([g.stem_keys.expand(-1, -1, -1, S, -1), keys], dim=-1)
    scores = (torch.matmul(qs, _group_keys(k_tok, g).transpose(-1, -2)) * scale).masked_fill(~keys, float("-inf"))
    scores = scores.permute(0, 3, 1, 2, 4).reshape(N * S, *qs.shape[1:3], g.key_width)
    return F.pad(scores, (0, width - g.key_width), value=float("-inf")) if width > g.key_width else scores


def _group_values(probs: torch.Tensor, v_tok: torch.Tensor, g: _SpanGroup) -> torch.Tensor:
    """Token-major probabilities over the suffix keys -> the group's (N * S, H, D) weighted values."""
    N, S = g.count, g.seg_len
    pl = _slot_major(probs[..., :g.key_width].index_select(0, g.seg_tokens), N, S)
    out = torch.matmul(pl, _group_keys(v_tok, g))  # (N, Hkv, G, S, D)
    return out.permute(0, 3, 1, 2, 4).reshape(N * S, -1, out.shape[-1])


def _attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                       scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout = kwargs.pop("pack_layout", None)
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    return packed_attention(query, key, value, layout, scaling, dropout), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, _attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


@contextmanager
def prefix_attention(llm: Any):
    """Within the block, `llm` (a transformers model, peft-wrapped or not) attends through
    `packed_attention` when a forward carries `pack_layout`."""
    _register()
    configs = list({id(m.config): m.config for m in llm.modules()
                    if hasattr(getattr(m, "config", None), "_attn_implementation")}.values())
    old = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = NAME
    try:
        yield
    finally:
        for c, name in zip(configs, old, strict=True):
            c._attn_implementation = name
