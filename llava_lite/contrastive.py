"""CLIP's symmetric contrastive (InfoNCE) loss with a learnable, clamped temperature.

Used by the align stage's optional contrastive term and by the dual encoder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# CLIP initialises the logit scale to 1/0.07 and clamps it at 100 so training stays stable.
INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100.0)


class LogitScale(nn.Module):
    """exp(log_scale), clamped to at most 100 as in CLIP."""

    def __init__(self, init: float = INIT_LOGIT_SCALE, max_log: float = MAX_LOGIT_SCALE) -> None:
        super().__init__()
        # One element rather than a scalar: FSDP2 cannot shard a 0-d parameter.
        self.log_scale = nn.Parameter(torch.tensor([float(init)]))
        self.max_log = max_log

    def forward(self) -> torch.Tensor:
        return self.log_scale.clamp(max=self.max_log).exp().squeeze(0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "log_scale"
        if key in state_dict and state_dict[key].dim() == 0:  # saved before it had one element
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def clip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    labels: torch.Tensor | None = None,
    hard_negatives: int | None = None,
) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy over a batch of matched pairs.

    Embeddings are L2-normalised here; row i of each is a matching pair.

    labels: optional group ids; pairs with equal ids are all positives (the target spreads
        evenly over them), so repeated captions such as class names are not pushed apart.
    hard_negatives: keep only the k most similar negatives of each row (plus its positives)
        in the softmax: hard-negative mining within the batch.
    """
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image {tuple(image_emb.shape)} and text {tuple(text_emb.shape)} embeddings differ")
    image_emb = F.normalize(image_emb.float(), dim=-1)
    text_emb = F.normalize(text_emb.float(), dim=-1)
    logits = logit_scale * image_emb @ text_emb.t()
    n = logits.shape[0]
    if labels is None and hard_negatives is None:
        targets = torch.arange(n, device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
    if labels is None:
        positive = torch.eye(n, dtype=torch.bool, device=logits.device)
    else:
        labels = labels.to(logits.device)
        positive = labels[:, None] == labels[None, :]
    return (_soft_ce(logits, positive, hard_negatives) + _soft_ce(logits.t(), positive.t(), hard_negatives)) / 2


def _soft_ce(logits: torch.Tensor, positive: torch.Tensor, hard_negatives: int | None) -> torch.Tensor:
    if hard_negatives is not None:
        negatives = logits.masked_fill(positive, float("-inf"))
        k = min(hard_negatives, logits.shape[1] - 1)
        keep = positive.clone()
        if k > 0:
            keep.scatter_(1, negatives.topk(k, dim=1).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    target = positive.float() / positive.sum(dim=1, keepdim=True)
    log_probs = F.log_softmax(logits, dim=1).masked_fill(~positive, 0.0)
    return -(target * log_probs).sum(dim=1).mean()
