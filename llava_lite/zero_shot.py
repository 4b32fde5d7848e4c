"""Zero-shot classification with prompt ensembling, and cross-modal retrieval, on any dual
encoder with `encode_images`/`encode_texts` (llava-lite's DualEncoder or a transformers
CLIPModel folder through `HFCLIP`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llava_lite.images import ImageInput

DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.",
                     "a photo of the {}.", "a close-up photo of a {}.")


def class_embeddings(model, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
    """One embedding per class: the normalised mean of its normalised template embeddings."""
    if not class_names:
        raise ValueError("no class names")
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise ValueError(f"every template needs a '{{}}' for the class name; got {list(templates)}")
    texts = [t.format(name) for name in class_names for t in templates]
    emb = F.normalize(model.encode_texts(texts).float(), dim=-1).view(len(class_names), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1)


@dataclass
class ZeroShotResult:
    labels: list[str]  # the best class per image
    indices: torch.Tensor  # (n,)
    probs: torch.Tensor  # (n, classes), softmax over the scaled cosine similarities


def zero_shot_classify(model, images: Sequence[ImageInput], class_names: Sequence[str],
                       templates: Sequence[str] = DEFAULT_TEMPLATES) -> ZeroShotResult:
    """Classify images among `class_names` from text alone (no training on those classes)."""
    classes = class_embeddings(model, class_names, templates)
    image_emb = F.normalize(model.encode_images(list(images)).float(), dim=-1)
    logits = model.logit_scale().detach().float() * image_emb @ classes.T
    probs = logits.softmax(-1)
    indices = probs.argmax(-1)
    return ZeroShotResult([class_names[i] for i in indices.tolist()], indices, probs)


def _is_image(item) -> bool:
    if isinstance(item, str):
        return os.path.isfile(item)
    return not isinstance(item, str)


def retrieve(model, queries: Sequence, gallery: Sequence, k: int = 5) -> list[list[tuple[int, float]]]:
    """Top-k gallery items (index, cosine) per query, across modalities: text queries search
    an image gallery, image queries (paths, PIL images, arrays) search a text gallery."""
    if not queries or not gallery:
        raise ValueError("retrieve needs at least one query and one gallery item")
    q_images = [_is_image(q) for q in queries]
    if len(set(q_images)) != 1:
        raise ValueError("queries must be all texts or all images")
    if q_images[0]:
        q, g = model.encode_images(list(queries)), model.encode_texts([str(t) for t in gallery])
    else:
        q, g = model.encode_texts(list(queries)), model.encode_images(list(gallery))
    sim = F.normalize(q.float(), dim=-1) @ F.normalize(g.float(), dim=-1).T
    top = sim.topk(min(k, len(gallery)), dim=1)
    return [list(zip(idx.tolist(), val.tolist(), strict=True)) for idx, val in zip(top.indices, top.values,
                                                                                   strict=True)]
