"""Projectors from vision features to LLM embeddings, registered by exact name."""

from __future__ import annotations

from torch import nn

from llava_lite.registry import PROJECTORS


@PROJECTORS.register("linear")
class LinearProjector(nn.Module):
    def __init__(self, vision_dim: int, text_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(vision_dim, text_dim)

    def forward(self, x):
        return self.linear(x)


@PROJECTORS.register("linear_ln")
class LinearLNProjector(nn.Module):
    def __init__(self, vision_dim: int, text_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(vision_dim, text_dim)
        self.norm = nn.LayerNorm(text_dim)

    def forward(self, x):
        return self.norm(self.linear(x))


@PROJECTORS.register("mlp2x_gelu")
class MLP2xGeluProjector(nn.Module):
    # Attribute names match transformers' LlavaMultiModalProjector so weights map 1:1.
    def __init__(self, vision_dim: int, text_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_dim, text_dim)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


@PROJECTORS.register("ln_mlp2x_gelu")
class LNMLP2xGeluProjector(MLP2xGeluProjector):
    """`mlp2x_gelu` after a LayerNorm of the vision features (the connector shape of Qwen2-VL's
    patch merger). CNN features are non-negative with a large shared offset; normalising them
    per token made colour several times quicker to learn for a probe on EfficientNet-Lite0."""

    def __init__(self, vision_dim: int, text_dim: int) -> None:
        super().__init__(vision_dim, text_dim)
        self.norm = nn.LayerNorm(vision_dim)

    def forward(self, x):
        return super().forward(self.norm(x))


def build_projector(name: str, vision_dim: int, text_dim: int) -> nn.Module:
    return PROJECTORS.get(name)(vision_dim, text_dim)
