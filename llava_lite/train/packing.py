"""Prefix-shared packing: single-question rows about the same image become one sequence.

Rows about one image usually share a long token prefix (system prompt, image block, an
instruction). A pack holds that prefix once, then each row's own suffix. A block attention
mask lets every suffix see the prefix and itself only, and its position ids restart where
the prefix ends. So each question is trained in exactly the context it has at inference
(no answer leaks from one question to another), and the pack's loss equals the sum of the
rows' separate losses, at a fraction of the tokens.

Suffixes that begin alike share that beginning too, one level deep: a *stem* segment holds
tokens that several rows have next (an answer-format instruction that most questions start
with, "what color is the"), and each of those rows' *leaf* segments sees the prefix, its stem
and itself. In the demo's adapter data the instruction alone is about 9 of a question's 23
suffix tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from llava_lite.llava_data import EncodedRow
from llava_lite.prompt_cache import common_prefix_len
from llava_lite.prompting import IGNORE_INDEX


@dataclass
class Pack:
    """Training item: one row, or several rows sharing a prefix (segment 0)."""

    input_ids: list[int]
    labels: list[int]
    images: list[str]
    segments: list[int] = field(default_factory=list)  # 0 = shared prefix / unpacked row, k = k-th suffix
    positions: list[int] = field(default_factory=list)
    members: int = 1
    # parents[k - 1]: the stem segment that suffix k continues (it sees that stem), 0 for none
    parents: list[int] = field(default_factory=list)


def single(row: EncodedRow) -> Pack:
    n = len(row.input_ids)
    return Pack(row.input_ids, row.labels, row.row.images, [0] * n, list(range(n)))


MIN_STEM = 2  # shorter shared beginnings are left in the rows' own suffixes


def _first_supervised(row: EncodedRow, start: int) -> int:
    return next((i for i in range(start, len(row.labels)) if row.labels[i] != IGNORE_INDEX), len(row.labels))


def _stem_end(rows: list[EncodedRow], p: int) -> int:
    """Where a stem shared by `rows` after position `p` ends: within their common tokens, before
    any supervised token (a shared token's loss would count once), and leaving each row a leaf
    whose first token is unsupervised (its predecessor in the pack is another segment)."""
    if len(rows) < 2:
        return p
    end = min(common_prefix_len(*(r.input_ids for r in rows)), *(_first_supervised(r, p) - 1 for r in rows))
    return end if end - p >= MIN_STEM else p


def _stem_groups(rows: list[EncodedRow], p: int) -> list[tuple[int, list[EncodedRow]]]:
    """Rows grouped by their first suffix token (in order of first appearance), with each
    group's stem end (`p` where the group has no stem)."""
    groups: OrderedDict[int, list[EncodedRow]] = OrderedDict()
    for r in rows:
        groups.setdefault(r.input_ids[p], []).append(r)
    return [(_stem_end(g, p), g) for g in groups.values()]


def _try_pack(rows: list[EncodedRow], image_token_id: int) -> Pack | None:
    ids = [r.input_ids for r in rows]
    p = common_prefix_len(*ids)
    for r in rows:
        # every image token must sit in the shared prefix, every row keeps a suffix, and a
        # suffix's first token is unsupervised (its predecessor in the pack is another row)
        if len(r.input_ids) <= p or r.labels[p] != IGNORE_INDEX:
            return None
        if image_token_id in r.input_ids[p:]:
            return None
    pack = Pack(list(ids[0][:p]), list(rows[0].labels[:p]), rows[0].row.images, [0] * p, list(range(p)),
                len(rows))
    for end, group in _stem_groups(rows, p):
        parent = 0
        if end > p:
            parent = _append_segment(pack, group[0].input_ids[p:end], group[0].labels[p:end], p, 0)
        for r in group:
            _append_segment(pack, r.input_ids[end:], r.labels[end:], end, parent)
    return pack


def _append_segment(pack: Pack, ids: list[int], labels: list[int], start: int, parent: int) -> int:
    k = len(pack.parents) + 1
    pack.input_ids += ids
    pack.labels += labels
    pack.segments += [k] * len(ids)
    pack.positions += list(range(start, start + len(ids)))
    pack.parents.append(parent)
    return k


def without_stems(pack: Pack) -> Pack:
    """The same rows with only the prefix shared, each stem copied into its leaves: the layout
    before stems (for comparisons; it trains identically, on more tokens)."""
    if not any(pack.parents):
        return pack
    spans: dict[int, list[int]] = {}
    for i, k in enumerate(pack.segments):
        spans.setdefault(k, []).append(i)
    p = len(spans[0])
    flat = Pack(pack.input_ids[:p], pack.labels[:p], pack.images, [0] * p, pack.positions[:p], pack.members)
    stems = set(pack.parents)
    for k, parent in enumerate(pack.parents, start=1):
        if k not in stems:
            idx = (spans[parent] if parent else []) + spans[k]
            _append_segment(flat, [pack.input_ids[i] for i in idx], [pack.labels[i] for i in idx],
                            pack.positions[idx[0]], 0)
    return flat


def pack_rows(rows: list[EncodedRow], image_token_id: int, max_members: int, max_length: int) -> list[Pack]:
    """Group rows by image (keeping order) and pack each group in chunks of at most
    `max_members` rows and `max_length` tokens; rows that cannot share a prefix stay single."""
    groups: OrderedDict[tuple[str, ...], list[EncodedRow]] = OrderedDict()
    for r in rows:
        groups.setdefault(tuple(r.row.images), []).append(r)
    packs: list[Pack] = []
    for group in groups.values():
        if len(group) == 1 or not group[0].row.images:
            packs += [single(r) for r in group]
            continue
        chunk: list[EncodedRow] = []
        for r in group:
            trial = _try_pack([*chunk, r], image_token_id) if chunk else None
            if chunk and (len(chunk) >= max_members or trial is None or len(trial.input_ids) > max_length):
                packs.append(_try_pack(chunk, image_token_id) if len(chunk) > 1 else single(chunk[0]))
                chunk = []
            chunk.append(r)
        if chunk:
            packs.append(_try_pack(chunk, image_token_id) if len(chunk) > 1 else single(chunk[0]))
    return packs


def pack_attention(packs: list[Pack], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, 1, width, width) boolean mask and (batch, width) position ids for right-padded packs.

    Token q sees token k if k <= q and k is in the prefix (segment 0), in q's own segment or in
    the stem q's segment continues. Padding positions see only themselves, so no attention row
    is empty.
    """
    mask = torch.zeros((len(packs), 1, width, width), dtype=torch.bool)
    positions = torch.zeros((len(packs), width), dtype=torch.long)
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    for b, pack in enumerate(packs):
        n = len(pack.input_ids)
        seg = torch.tensor(pack.segments)
        parent = torch.tensor([0, *pack.parents])[seg] if pack.parents else torch.zeros_like(seg)
        allowed = (seg[None, :] == 0) | (seg[None, :] == seg[:, None]) | (seg[None, :] == parent[:, None])
        mask[b, 0, :n, :n] = allowed & causal[:n, :n]
        idx = torch.arange(n, width)
        mask[b, 0, idx, idx] = True
        positions[b, :n] = torch.tensor(pack.positions)
    return mask, positions
