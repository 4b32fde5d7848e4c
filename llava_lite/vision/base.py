"""What every vision tower provides: preprocessing, a token count and frozen features."""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn


class VisionTower(nn.Module):
    """A frozen image encoder giving (batch, num_tokens, hidden_size) features.

    Subclasses set `num_tokens` and `hidden_size`, implement `preprocess` (RGB PIL images to
    a pixel tensor) and `encode` (pixels to features). The tower never trains: parameters
    have requires_grad=False and `train()` keeps it in eval mode (batch-norm statistics and
    dropout stay fixed).
    """

    num_tokens: int
    hidden_size: int
    # Towers with a classifier head (EfficientNet's ImageNet head) name its classes; towers
    # without one (CLIP) leave this None and `class_probs` returns None.
    class_names: list[str] | None = None

    def freeze(self) -> VisionTower:
        for param in self.parameters():
            param.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> VisionTower:  # noqa: ARG002 - always frozen
        return super().train(False)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def class_probs(self, features: torch.Tensor) -> torch.Tensor | None:
        """(batch, len(class_names)) probabilities from the tower's classifier head, computed
        from its own `encode` output (so cached features suffice); None without a head."""
        return None

    def pooled_class_probs(self, pooled: torch.Tensor) -> torch.Tensor | None:
        """The same from `encode`'s tokens averaged into one (batch, hidden_size) vector, the
        form the dual encoder caches; None without a head."""
        return None

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.encode(pixel_values)
        if feats.shape[1:] != (self.num_tokens, self.hidden_size):
            raise RuntimeError(
                f"{type(self).__name__} produced features of shape {tuple(feats.shape)}, "
                f"expected (batch, {self.num_tokens}, {self.hidden_size})"
            )
        return feats

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
