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
class _PackIndex:
    width: int  # P: the longest prefix (segment 0) in the batch
    prefix_keys: torch.Tensor  # (B, 1, 1, L, P): which prefix key each token sees
    seg_len: int  # S: the longest suffix
    seg_tokens: torch.Tensor  # (N * S,) flat token index of each suffix slot (clamped where padded)
    local_keys: torch.Tensor  # (N, 1, 1, S, S): causal within the suffix, real keys only
    token_slot: torch.Tensor  # (B * L,) each token's suffix slot, or N * S (none) for the rest
    stem: torch.Tensor | None  # (N,) the suffix whose keys each suffix also sees (N: none); None if no stems
    stem_keys: torch.Tensor | None  # (N, 1, 1, 1, T): the real keys of that stem (T: the longest stem)


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


def _stem_index(seg: torch.Tensor, parents: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor,
                valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each suffix span, the span of the stem it continues (N for none), and that stem's real keys."""
    N = len(rows)
    ids = seg[rows, starts]
    span_of = torch.full_like(parents, N)
    span_of[rows, ids] = torch.arange(N, device=seg.device)
    stem = span_of[rows, parents[rows, ids]]  # a parent 0 (none) finds N: no span is segment 0
    keys = torch.cat([valid, valid.new_zeros(1, valid.shape[1])]).index_select(0, stem)
    longest = max(int(keys.sum(1).max()), 1)  # stems are short: their key block is this wide, not S
    return stem, keys[:, None, None, None, :longest]


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
    N, S = len(lengths), max(int(lengths.max()) if len(lengths) else 1, 1)
    r = torch.arange(S, device=seg.device)
    valid = r[None, :] < lengths[:, None]
    seg_tokens = rows[:, None] * L + starts[:, None] + torch.minimum(r[None, :], (lengths - 1)[:, None])
    local_keys = (r[None, :] <= r[:, None])[None] & valid[:, None, :]
    token_slot = torch.full((B * L,), N * S, dtype=torch.long, device=seg.device)
    token_slot[seg_tokens[valid]] = torch.arange(N * S, device=seg.device).view(N, S)[valid]
    stem, stem_keys = None, None
    if parents is not None and N:
        stem, stem_keys = _stem_index(seg, parents, rows, starts, valid)
    return _PackIndex(P, prefix_keys[:, None, None], S, seg_tokens.reshape(-1), local_keys[:, None, None],
                      token_slot, stem, stem_keys)


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
    of scores gives exactly the masked attention's weights, at P + S (+ S) scores per token
    instead of L.
    """
    B, H, L, D = query.shape
    Hkv = key.shape[1]
    G = H // Hkv
    P, S = ix.width, ix.seg_len
    N = ix.seg_tokens.numel() // S
    scale = D ** -0.5 if scaling is None else scaling
    q = query.view(B, Hkv, G, L, D)
    scores = torch.matmul(q, key[:, :, None, :P].transpose(-1, -2)) * scale  # (B, Hkv, G, L, P)
    scores = _token_major(scores.masked_fill(~ix.prefix_keys, float("-inf")))
    if N:
        q_tok = _token_major(q)
        k_tok = key.permute(0, 2, 1, 3).reshape(B * L, Hkv, 1, D)
        v_tok = value.permute(0, 2, 1, 3).reshape(B * L, Hkv, 1, D)
        ks = _slot_major(k_tok.index_select(0, ix.seg_tokens), N, S)
        vs = _slot_major(v_tok.index_select(0, ix.seg_tokens), N, S)
        ks, vs, keys = _with_stems(ks, vs, ix) if ix.stem is not None else (ks, vs, ix.local_keys)
        K = ks.shape[-2]  # S, or T + S with stems: each slot's stem keys, then its own suffix's
        local = torch.matmul(_slot_major(q_tok.index_select(0, ix.seg_tokens), N, S), ks.transpose(-1, -2)) * scale
        local = local.masked_fill(~keys, float("-inf")).permute(0, 3, 1, 2, 4).reshape(N * S, Hkv, G, K)
        none = local.new_full((1, Hkv, G, K), float("-inf"))
        scores = torch.cat([scores, torch.cat([local, none]).index_select(0, ix.token_slot)], dim=-1)
    probs = F.dropout(scores.float().softmax(-1), dropout, training=dropout > 0).to(value.dtype)
    pp = probs[..., :P].view(B, L, Hkv, G, P).permute(0, 2, 3, 1, 4)
    out = torch.matmul(pp, value[:, :, None, :P]).permute(0, 3, 1, 2, 4).reshape(B * L, H, D)
    if N:
        pl = _slot_major(probs[..., P:].index_select(0, ix.seg_tokens), N, S)
        local_out = torch.matmul(pl, vs).permute(0, 3, 1, 2, 4).reshape(N * S, H, D)
        out = out + torch.cat([local_out, local_out.new_zeros(1, H, D)]).index_select(0, ix.token_slot)
    return out.view(B, L, H, D)


def _with_stems(ks: torch.Tensor, vs: torch.Tensor, ix: _PackIndex) -> tuple[torch.Tensor, ...]:
    """(N, Hkv, 1, S, D) slot keys/values -> (N, Hkv, 1, T + S, D) with each suffix's stem first, and
    the (N, 1, 1, S, T + S) mask: all of the stem's real keys, then causal within the suffix."""
    T = ix.stem_keys.shape[-1]

    def stem_of(x: torch.Tensor) -> torch.Tensor:
        x = x[..., :T, :]
        return torch.cat([x, x.new_zeros(1, *x.shape[1:])]).index_select(0, ix.stem)

    keys = torch.cat([ix.stem_keys.expand(-1, -1, -1, ix.seg_len, -1), ix.local_keys], dim=-1)
    return torch.cat([stem_of(ks), ks], dim=-2), torch.cat([stem_of(vs), vs], dim=-2), keys


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
