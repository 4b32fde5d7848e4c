"""Prefix-shared packing: single-question rows about the same image become one sequence.

Rows about one image usually share a long token prefix (system prompt, image block, an
instruction). A pack holds that prefix once, then each row's own suffix. A block attention
mask lets every suffix see the prefix and itself only, and its position ids restart where
the prefix ends. So each question is trained in exactly the context it has at inference
(no answer leaks from one question to another), and the pack's loss equals the sum of the
rows' separate losses, at a fraction of the tokens.
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


def single(row: EncodedRow) -> Pack:
    n = len(row.input_ids)
    return Pack(row.input_ids, row.labels, row.row.images, [0] * n, list(range(n)))


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
    input_ids, labels = list(ids[0][:p]), list(rows[0].labels[:p])
    segments, positions = [0] * p, list(range(p))
    for k, r in enumerate(rows, start=1):
        tail = r.input_ids[p:]
        input_ids += tail
        labels += r.labels[p:]
        segments += [k] * len(tail)
        positions += list(range(p, p + len(tail)))
    return Pack(input_ids, labels, rows[0].row.images, segments, positions, len(rows))


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

    Token q sees token k if k <= q and k is in the prefix (segment 0) or in q's own segment.
    Padding positions see only themselves, so no attention row is empty.
    """
    mask = torch.zeros((len(packs), 1, width, width), dtype=torch.bool)
    positions = torch.zeros((len(packs), width), dtype=torch.long)
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    for b, pack in enumerate(packs):
        n = len(pack.input_ids)
        seg = torch.tensor(pack.segments)
        allowed = (seg[None, :] == 0) | (seg[None, :] == seg[:, None])
        mask[b, 0, :n, :n] = allowed & causal[:n, :n]
        idx = torch.arange(n, width)
        mask[b, 0, idx, idx] = True
        positions[b, :n] = torch.tensor(pack.positions)
    return mask, positions
