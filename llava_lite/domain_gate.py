"""Is an image like the ones the model was trained on? A novelty score on tower features.

The score is the PCA reconstruction error (the distance from the principal subspace) of an
image's mean-pooled tower features, with the subspace fitted on the training images. Drawn
shapes lie close to a low-dimensional subspace; a photo's features do not. Measured with the
default model's gate (EfficientNet-Lite0 + block 5, 32 dimensions fitted on its 5,500
training images, threshold 14.2): all 1,000 easy-VQA test images score 2.6-7.7 and the 200
held-out scenes 2.9-7.6 (all inside), the 18 photos of `llava-lite eval --task photos`
20.3-52.3 (all outside). The threshold is a margin over the largest training score, so every
training image is inside by construction.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

GATE_NAME = "domain_gate.safetensors"


def pooled(features: torch.Tensor) -> torch.Tensor:
    """(batch, tokens, hidden) tower features -> (batch, hidden) means, in fp32; features
    already pooled (batch, hidden) pass through."""
    return features.float() if features.dim() == 2 else features.float().mean(1)


class DomainGate:
    """`outside(features)` is True for images unlike the training images.

    A plain object, not a module: its statistics stay fp32 on the CPU whatever dtype or
    device the model is moved to (a bf16 mean would inflate every score)."""

    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, threshold: float) -> None:
        self.mean = mean.detach().cpu().double()
        self.basis = basis.detach().cpu().double()  # (dims, hidden), orthonormal rows
        self.threshold = float(threshold)

    @classmethod
    def fit(cls, features: torch.Tensor, dims: int = 32, margin: float = 1.5) -> DomainGate:
        """Fit on the training images' tower features, (batch, tokens, hidden) or pooled."""
        x = pooled(features).double()
        if x.shape[0] <= dims:
            raise ValueError(f"fitting a {dims}-dimensional domain gate needs more than {dims} images; "
                             f"got {x.shape[0]}")
        mean = x.mean(0)
        _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
        gate = cls(mean, v[:dims], 0.0)
        gate.threshold = margin * float(gate.scores(x).max())
        return gate

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Distance of each image's pooled features from the training subspace."""
        x = pooled(features).cpu().double() - self.mean
        return (x - (x @ self.basis.T) @ self.basis).norm(dim=1).float()

    def outside(self, features: torch.Tensor) -> torch.Tensor:
        return self.scores(features) > self.threshold

    def save(self, path: str | Path) -> None:
        tensors = {"mean": self.mean.float().contiguous(), "basis": self.basis.float().contiguous(),
                   "threshold": torch.tensor(self.threshold, dtype=torch.float64)}
        save_file(tensors, str(path), metadata={"format": "pt"})

    @classmethod
    def load(cls, path: str | Path) -> DomainGate:
        tensors = load_file(str(path))
        missing = {"mean", "basis", "threshold"} - set(tensors)
        if missing:
            raise ValueError(f"{path}: not a domain gate (missing {sorted(missing)})")
        return cls(tensors["mean"], tensors["basis"], float(tensors["threshold"]))
