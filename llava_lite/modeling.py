"""The model: frozen tower -> projector -> image features scattered into the LLM's embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llava_lite.config import LlavaLiteConfig
from llava_lite.domain_gate import DomainGate
from llava_lite.label_bridge import ImageEvidence
from llava_lite.llm import output_cache
from llava_lite.prompting import IGNORE_INDEX
from llava_lite.vision.base import VisionTower


class ImageTokenMismatchError(ValueError):
    """The number of image placeholder tokens does not match the image features given."""


@dataclass
class LlavaLiteOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None
    past_key_values: object | None = None
    num_label_tokens: int = 0


class LlavaLiteModel(nn.Module):
    """Owns tensors only; text and image preprocessing live in the processor.

    Image placeholders are real token ids in `input_ids`; their embeddings are replaced by
    projected image features with one `masked_scatter`, after checking the counts agree.
    The image token may lie outside the LLM's vocabulary: its positions are looked up as id 0
    and then overwritten.
    """

    def __init__(
        self,
        config: LlavaLiteConfig,
        vision_tower: VisionTower,
        projector: nn.Module,
        llm: nn.Module,
        image_token_id: int,
    ) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower
        self.projector = projector
        self.llm = llm
        self.image_token_id = image_token_id
        # Fitted by a training stage when `config.label_bridge` is on (llava_lite.label_bridge).
        self.domain_gate: DomainGate | None = None

    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    # -- images ----------------------------------------------------------------------
    def encode_images(
        self,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Projected image embeddings (num_images, tokens, llm_hidden) from pixels or cached
        tower features."""
        if vision_features is None:
            if pixel_values is None:
                raise ValueError("give pixel_values or vision_features")
            vision_features = self.vision_tower(pixel_values.to(self.vision_tower.device))
        return self.projector(vision_features.to(self.device, self.dtype))

    @torch.no_grad()
    def image_evidence(self, vision_features: torch.Tensor, k: int = 5) -> list[ImageEvidence] | None:
        """Per image: the tower head's top `k` classes and, with a domain gate, whether the
        image lies outside the training images. None for a tower without a head (CLIP)."""
        tower = self.vision_tower
        if tower.class_names is None:
            return None
        top = tower.class_probs(vision_features).topk(min(k, len(tower.class_names)))
        gate = self.domain_gate
        scores = gate.scores(vision_features).tolist() if gate is not None else [0.0] * len(top.values)
        threshold = gate.threshold if gate is not None else float("inf")
        return [ImageEvidence([(tower.class_names[i], round(float(p), 4)) for p, i in zip(ps, ids, strict=True)],
                              outside=score > threshold, score=round(score, 3), threshold=round(threshold, 3))
                for ps, ids, score in zip(top.values, top.indices, scores, strict=True)]

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with image features scattered into the placeholder positions."""
        image_mask = input_ids == self.image_token_id
        n_slots = int(image_mask.sum())
        n_feats = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
        if n_slots != n_feats:
            per_image = "?" if image_embeds is None else image_embeds.shape[1]
            n_images = 0 if image_embeds is None else image_embeds.shape[0]
            raise ImageTokenMismatchError(
                f"input has {n_slots} image tokens but {n_images} image(s) x {per_image} tokens "
                f"= {n_feats} features were given; each image placeholder must match one image"
            )
        embed_layer = self.llm.get_input_embeddings()
        embeds = embed_layer(input_ids.masked_fill(image_mask, 0))
        if n_slots:
            flat = image_embeds.reshape(-1, image_embeds.shape[-1]).to(embeds.dtype)
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), flat)
        return embeds

    # -- forward ---------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_logits: bool = True,
        **llm_kwargs,
    ) -> LlavaLiteOutput:
        """With `labels`, the LM head runs only where a label exists (it dominates the step
        cost over a 49k vocabulary), and the loss is their mean cross-entropy."""
        if image_embeds is None and (pixel_values is not None or vision_features is not None):
            image_embeds = self.encode_images(pixel_values, vision_features)
        embeds = self.embed(input_ids, image_embeds)
        if labels is None:
            out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, **llm_kwargs)
            return LlavaLiteOutput(None, out.logits, output_cache(out))

        decoder = self.llm.get_decoder()
        # no KV cache in a training forward: it would only hold every layer's keys and values
        hidden = decoder(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False,
                         **llm_kwargs).last_hidden_state
        shift_labels = labels[:, 1:]
        keep = shift_labels != IGNORE_INDEX
        n_label = int(keep.sum())
        if n_label == 0:
            raise ValueError("batch has no supervised tokens (all labels are -100)")
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][keep])
        loss = F.cross_entropy(logits.float(), shift_labels[keep])
        return LlavaLiteOutput(loss, logits if return_logits else None, None, n_label)

    # -- generation ------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """transformers `generate` on the merged embeddings (KV cache on); returns new tokens."""
        embeds = self.embed(input_ids, image_embeds)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)
