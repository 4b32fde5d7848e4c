"""transformers CLIP / SigLIP vision models by Hub id or local folder."""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn

from llava_lite.config import ConfigError, VisionConfig
from llava_lite.registry import VISION_TOWERS
from llava_lite.vision.base import VisionTower


class CLIPTower(VisionTower):
    """Wraps a `CLIPVisionModel` or `SiglipVisionModel`.

    Features are the hidden states of `feature_layer`; `patch` drops the CLS token (as LLaVA
    and transformers' `vision_feature_select_strategy="default"` do), `cls_patch` keeps it.
    SigLIP has no CLS token, so both strategies keep every patch.
    """

    def __init__(self, model: nn.Module, image_processor, feature_layer: int, strategy: str) -> None:
        super().__init__()
        self.model = model
        self.image_processor = image_processor
        self.feature_layer = feature_layer
        self.strategy = strategy
        vcfg = model.config
        self.has_cls = vcfg.model_type == "clip_vision_model"
        patches = (vcfg.image_size // vcfg.patch_size) ** 2
        self.num_tokens = patches + (1 if self.has_cls and strategy == "cls_patch" else 0)
        self.hidden_size = vcfg.hidden_size
        self.freeze()

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values.to(self.dtype), output_hidden_states=True)
        feats = out.hidden_states[self.feature_layer]
        if self.has_cls and self.strategy == "patch":
            feats = feats[:, 1:]
        return feats


def image_processor_for(vision_config, source: str | None):
    """A PIL-backed image processor (torchvision is not required) for a CLIP/SigLIP config."""
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    cls = SiglipImageProcessorPil if vision_config.model_type == "siglip_vision_model" else CLIPImageProcessorPil
    if source is not None:
        try:
            return cls.from_pretrained(source)
        except (OSError, ValueError):
            pass  # a folder without preprocessor_config.json: fall back to the model's size
    size = vision_config.image_size
    if cls is CLIPImageProcessorPil:
        return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return cls(size={"height": size, "width": size})


def load_vision_model(model_id: str) -> nn.Module:
    from transformers import AutoConfig, CLIPVisionModel, SiglipVisionModel

    cfg = AutoConfig.from_pretrained(model_id)
    # A full CLIP/SigLIP checkpoint holds a text tower too; take only the vision half.
    model_type = getattr(cfg, "model_type", None)
    if model_type in ("clip", "clip_vision_model"):
        return CLIPVisionModel.from_pretrained(model_id, dtype=torch.float32)
    if model_type in ("siglip", "siglip_vision_model"):
        return SiglipVisionModel.from_pretrained(model_id, dtype=torch.float32)
    raise ConfigError(f"vision.model_id={model_id!r} is a {model_type!r} model, not CLIP or SigLIP")


@VISION_TOWERS.register("clip")
def build_clip(config: VisionConfig) -> CLIPTower:
    if not config.model_id:
        raise ConfigError("vision.name='clip' needs vision.model_id (a Hub id or local folder)")
    if config.concat_blocks:
        raise ConfigError("vision.concat_blocks is for CNN towers; a 'clip' tower uses vision.feature_layer")
    model = load_vision_model(config.model_id)
    processor = image_processor_for(model.config, config.model_id)
    return CLIPTower(model, processor, config.feature_layer, config.feature_strategy)
