"""A request's images through the tower once: projected tokens, or the label bridge's text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llava_lite.config import LabelBridgeConfig
from llava_lite.image_cache import ImageEmbedCache, image_key
from llava_lite.images import ImageInput, load_image
from llava_lite.label_bridge import ImageEvidence, bridged_messages, evidence_text


@dataclass(frozen=True)
class ImageView:
    """One image after the tower: its projected tokens, the head's evidence (None for CLIP)
    and, when the label bridge is on and the domain gate put the image outside the training
    images, the text shown to the LLM instead."""

    key: str
    embed: torch.Tensor
    evidence: ImageEvidence | None = None
    bridge_text: str | None = None


def _bridge_text(evidence: ImageEvidence | None, bridge: LabelBridgeConfig) -> str | None:
    if not bridge.enabled or evidence is None or not evidence.outside:
        return None
    return evidence_text(evidence.classes, bridge)


def image_views(model, processor, cache: ImageEmbedCache, images: Sequence[ImageInput]) -> list[ImageView]:
    """Each image loaded, hashed and run through the tower once (then served from `cache`)."""
    pil = [load_image(img) for img in images]
    keys = [image_key(img) for img in pil]
    found = {i: cache.get(k) for i, k in enumerate(keys)}
    missing = [i for i, view in found.items() if view is None]
    if missing:
        bridge = model.config.label_bridge
        with torch.no_grad():
            pixels = processor.image_preprocess([pil[i] for i in missing])
            feats = model.vision_tower(pixels.to(model.vision_tower.device))
            embeds = model.encode_images(vision_features=feats)
            evidence = model.image_evidence(feats)  # None for a tower without a head
        for row, i in enumerate(missing):
            seen = evidence[row] if evidence else None
            found[i] = ImageView(keys[i], embeds[row], seen, _bridge_text(seen, bridge))
            cache.put(keys[i], found[i])
    return [found[i] for i in range(len(pil))]


def bridge_messages(messages: Sequence[dict[str, Any]], views: list[ImageView],
                    image_token: str) -> tuple[list[dict[str, Any]], list[ImageView]]:
    """The placeholders of bridged images replaced by their evidence text, and the views
    that still go in as image tokens."""
    texts = [v.bridge_text for v in views]
    if any(t is not None for t in texts):
        messages = bridged_messages(messages, texts, image_token)
    return list(messages), [v for v, t in zip(views, texts, strict=True) if t is None]
