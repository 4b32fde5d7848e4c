"""A request's images through the tower once: projected tokens, or the label bridge's text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from llava_lite.config import LabelBridgeConfig
from llava_lite.image_cache import ImageEmbedCache
from llava_lite.label_bridge import ImageEvidence, evidence_text


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


def image_views(model, processor, cache: ImageEmbedCache, pil: Sequence[Image.Image],
                keys: Sequence[str]) -> list[ImageView]:
    """Loaded images (with their content keys) through the tower once, then from `cache`."""
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


@dataclass
class PreparedPrompt:
    """A prompt ready for the LLM: token ids, the projected embeddings of the images that go
    in as tokens and their keys (the prompt cache's), and every image's view, bridged or not."""

    ids: list[int]
    embeds: torch.Tensor | None
    keys: list[str]
    views: list[ImageView]


def prepared_prompt(processor, conversation, views: list[ImageView], max_new_tokens: int) -> PreparedPrompt:
    """Render and tokenize `conversation` once, bridged images as their evidence text."""
    ids = processor.encode(conversation, image_texts=[v.bridge_text for v in views], max_new_tokens=max_new_tokens)
    kept = [v for v in views if v.bridge_text is None]
    embeds = torch.stack([v.embed for v in kept]) if kept else None
    return PreparedPrompt(ids, embeds, [v.key for v in kept], views)
