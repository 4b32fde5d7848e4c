"""Cross-modal retrieval metrics: recall@K in both directions, and the mean cosine of
matched and unmatched image-text pairs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def recall_at_k(sim: torch.Tensor, relevant: Sequence[set[int]], ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Share of queries (rows of `sim`) with a relevant gallery item among their top K."""
    if sim.shape[0] != len(relevant):
        raise ValueError(f"{sim.shape[0]} queries but {len(relevant)} relevance sets")
    k_max = min(max(ks), sim.shape[1])
    top = sim.topk(k_max, dim=1).indices.tolist()
    out = {}
    for k in ks:
        hits = sum(bool(relevant[q] & set(top[q][:k])) for q in range(len(relevant)))
        out[k] = hits / len(relevant)
    return out


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_image: Sequence[int | set[int]] | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """R@K image->text and text->image for embeddings of images (n_img, d) and texts
    (n_txt, d). `text_image[j]` is the image text j describes, or the set of images it
    describes equally well (default: text j <-> image j).
    Embeddings are L2-normalised here, so raw pooled features can be passed."""
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float(), dim=-1)
    if text_image is None:
        if len(img) != len(txt):
            raise ValueError("give text_image when the numbers of images and texts differ")
        text_image = list(range(len(txt)))
    images_of = [set(t) if isinstance(t, (set, frozenset, list, tuple)) else {int(t)} for t in text_image]
    sim = img @ txt.T
    texts_of: list[set[int]] = [set() for _ in range(len(img))]
    for j, imgs in enumerate(images_of):
        for i in imgs:
            texts_of[i].add(j)
    out: dict[str, float] = {}
    for k, v in recall_at_k(sim, texts_of, ks).items():
        out[f"i2t_R@{k}"] = v
    for k, v in recall_at_k(sim.T, images_of, ks).items():
        out[f"t2i_R@{k}"] = v
    matched = torch.zeros_like(sim, dtype=torch.bool)
    for j, imgs in enumerate(images_of):
        matched[list(imgs), j] = True
    out["matched_cos"] = sim[matched].mean().item()
    out["unmatched_cos"] = sim[~matched].mean().item() if (~matched).any() else float("nan")
    return out
