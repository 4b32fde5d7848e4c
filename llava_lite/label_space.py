"""Zero-shot through a tower's label space, with no training (ConSE: Norouzi et al., 2014,
"Zero-Shot Learning by Convex Combination of Semantic Embeddings").

An image goes through the tower's own classifier head (EfficientNet's 1,000 ImageNet classes);
its embedding is the probability-weighted mean of the text embeddings of its top `top_t` class
names. A text is embedded by the same sentence encoder (the packaged MiniLM), so images and
texts meet in the text encoder's space. It has the dual-encoder interface (`encode_images`,
`encode_texts`, `logit_scale`), so `zero_shot_classify`, `retrieve` and `llava-lite zeroshot
--model label-space` use it as they are. CLIP towers have no head, and need no bridge.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llava_lite.config import ConfigError, VisionConfig
from llava_lite.dual_encoder import NAME_TEMPLATE, TEXT_ENCODERS, TextEncoderConfig, conse
from llava_lite.images import ImageInput, load_image
from llava_lite.registry import VISION_TOWERS

LABEL_SPACE = "label-space"  # the name `load_dual_encoder` and the CLI's --model accept


class LabelSpaceEncoder:
    """Images -> head probabilities -> convex combination of class-name text embeddings."""

    def __init__(self, vision: VisionConfig | None = None, text: TextEncoderConfig | None = None,
                 top_t: int = 10, scale: float = 100.0) -> None:
        vision = vision or VisionConfig(name="efficientnet-lite0")
        self.tower = VISION_TOWERS.get(vision.name)(vision)
        if self.tower.class_names is None:
            raise ConfigError(f"vision tower {vision.name!r} has no classifier head, so it has no label space; "
                              "a CLIP tower has its own text side (use its CLIPModel folder)")
        text = text or TextEncoderConfig()
        self.text = TEXT_ENCODERS.get(text.name)(text)
        self.max_length = text.max_length
        self.top_t = min(top_t, len(self.tower.class_names))
        self.scale = scale
        self._names: torch.Tensor | None = None

    def logit_scale(self) -> torch.Tensor:
        return torch.tensor(self.scale)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        return self.text.unit_embeddings(texts, self.max_length, batch_size)

    def name_embeddings(self) -> torch.Tensor:
        """(classes, dim) text embeddings of the head's class names, computed once."""
        if self._names is None:
            self._names = self.encode_texts([NAME_TEMPLATE.format(n) for n in self.tower.class_names])
        return self._names

    @torch.no_grad()
    def class_probs(self, images: Sequence[ImageInput], batch_size: int = 64) -> torch.Tensor:
        out = []
        for start in range(0, len(images), batch_size):
            pixels = self.tower.preprocess([load_image(img) for img in images[start:start + batch_size]])
            out.append(self.tower.class_probs(self.tower(pixels)))
        return torch.cat(out)

    def embed_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """ConSE: the renormalised top-T probabilities weight their class names' embeddings."""
        return conse(probs, self.name_embeddings(), self.top_t)

    def encode_images(self, images: Sequence[ImageInput], batch_size: int = 64) -> torch.Tensor:
        return self.embed_probs(self.class_probs(images, batch_size))
