"""A CLIP-style dual encoder: an image tower from the registry and a text encoder, each with
a linear head into a shared, L2-normalised space, and a learnable clamped temperature.

`lock_image=True` is LiT (the image tower stays frozen, only the text side and the heads
learn); `lock_image=False` trains the tower too. The loss is `llava_lite.contrastive.clip_loss`,
the same code as the align stage's contrastive term.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llava_lite.config import ConfigError, VisionConfig
from llava_lite.contrastive import LogitScale, clip_loss
from llava_lite.images import ImageInput, load_image
from llava_lite.registry import VISION_TOWERS, Registry
from llava_lite.settings import Settings

TEXT_ENCODERS: Registry = Registry("text encoder")
CONFIG_NAME = "dual_encoder.json"
WEIGHTS_NAME = "dual_encoder.safetensors"
IMAGE_PRIORS = ("none", "label-space")
NAME_TEMPLATE = "a photo of a {}."  # how a head's class name is embedded as text


@dataclass
class TextEncoderConfig:
    """name: `minilm` (a mean-pooled sentence encoder; the packaged all-MiniLM-L6-v2 unless
    model_id names another BERT-like folder) or `clip-text` (transformers CLIPTextModel)."""

    name: str = "minilm"
    model_id: str | None = None
    max_length: int = 64


@dataclass
class DualEncoderConfig(Settings):
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(name="efficientnet-lite0"))
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    embed_dim: int = 256
    lock_image: bool = True  # LiT
    lock_text: bool = False
    # "label-space": the image side starts as the ConSE embedding of the tower head's classes
    # (`llava_lite.label_space`) and the text side as the text encoder's own embedding; the
    # heads learn residuals from zero, so training starts at zero-shot-through-labels and adds
    # to it. Needs a tower with a classifier head, lock_text and embed_dim = the text width.
    image_prior: str = "none"

    def validate(self) -> DualEncoderConfig:
        if self.image_prior not in IMAGE_PRIORS:
            raise ConfigError(f"image_prior={self.image_prior!r}; use one of {IMAGE_PRIORS}")
        if self.image_prior == "label-space" and not self.lock_text:
            raise ConfigError("image_prior='label-space' needs lock_text=true: the class names are embedded "
                              "once by the frozen text encoder, and a moving text side would leave them behind")
        if self.vision.name not in VISION_TOWERS:
            raise ConfigError(f"vision.name {self.vision.name!r}; registered: {sorted(VISION_TOWERS)}")
        if self.text.name not in TEXT_ENCODERS:
            raise ConfigError(f"text.name {self.text.name!r}; registered: {sorted(TEXT_ENCODERS)}")
        if self.embed_dim < 1:
            raise ConfigError(f"embed_dim must be positive, got {self.embed_dim}")
        return self



def conse(probs: torch.Tensor, names: torch.Tensor, top_t: int = 10) -> torch.Tensor:
    """ConSE (Norouzi et al., 2014): the renormalised top-`top_t` class probabilities weight
    their names' text embeddings `names` (classes, dim); unit-length rows."""
    top = probs.float().topk(min(top_t, probs.shape[-1]), dim=-1)
    weights = top.values / top.values.sum(-1, keepdim=True)
    return F.normalize((weights.unsqueeze(-1) * names[top.indices]).sum(1), dim=-1)


@dataclass
class TextEncoder:
    model: nn.Module
    tokenizer: Any
    hidden_size: int
    pool: Callable[[Any, torch.Tensor], torch.Tensor]  # (model output, attention mask) -> (B, H)

    def pooled(self, texts: Sequence[str], max_length: int, device: torch.device | None = None) -> torch.Tensor:
        """(B, hidden_size) pooled encoder outputs of `texts`."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt")
        if device is not None:
            batch = batch.to(device)
        return self.pool(self.model(**batch), batch["attention_mask"])

    @torch.no_grad()
    def unit_embeddings(self, texts: Sequence[str], max_length: int, batch_size: int = 256) -> torch.Tensor:
        """(N, hidden_size) unit-length pooled embeddings, `batch_size` texts at a time."""
        out = [F.normalize(self.pooled(texts[i:i + batch_size], max_length).float(), dim=-1)
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.hidden_size)


def _mean_pool(output, mask: torch.Tensor) -> torch.Tensor:
    hidden = output.last_hidden_state
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


@TEXT_ENCODERS.register("minilm")
def _minilm(config: TextEncoderConfig) -> TextEncoder:
    from transformers import AutoModel, AutoTokenizer

    from llava_lite.packaged import minilm_folder

    path = config.model_id or str(minilm_folder())
    model = AutoModel.from_pretrained(path)
    return TextEncoder(model, AutoTokenizer.from_pretrained(path), model.config.hidden_size, _mean_pool)


@TEXT_ENCODERS.register("clip-text")
def _clip_text(config: TextEncoderConfig) -> TextEncoder:
    from transformers import AutoTokenizer, CLIPTextModel

    if not config.model_id:
        raise ConfigError("text.name 'clip-text' needs text.model_id (a CLIP folder or Hub id)")
    model = CLIPTextModel.from_pretrained(config.model_id)
    return TextEncoder(model, AutoTokenizer.from_pretrained(config.model_id), model.config.hidden_size,
                       lambda out, mask: out.pooler_output)


class DualEncoder(nn.Module):
    """Image and text embeddings in one space; `loss` is CLIP's symmetric InfoNCE."""

    def __init__(self, config: DualEncoderConfig) -> None:
        super().__init__()
        self.config = config.validate()
        self.tower = VISION_TOWERS.get(config.vision.name)(config.vision)
        if not config.lock_image:
            for p in self.tower.parameters():
                p.requires_grad_(True)
        text = TEXT_ENCODERS.get(config.text.name)(config.text)
        self.text_model, self.tokenizer, self._text = text.model, text.tokenizer, text
        if config.lock_text:
            self.text_model.requires_grad_(False)
        self.image_head = nn.Linear(self.tower.hidden_size, config.embed_dim, bias=False)
        self.text_head = nn.Linear(text.hidden_size, config.embed_dim, bias=False)
        self.logit_scale = LogitScale()
        if config.image_prior == "label-space":
            self._start_from_label_space(text.hidden_size)

    def _start_from_label_space(self, text_width: int) -> None:
        if self.tower.class_names is None:
            raise ConfigError(f"image_prior='label-space' needs a tower with a classifier head; "
                              f"{self.config.vision.name!r} has none")
        if self.config.embed_dim != text_width:
            raise ConfigError(f"image_prior='label-space' embeds into the text encoder's space: set "
                              f"embed_dim={text_width}, not {self.config.embed_dim}")
        nn.init.zeros_(self.image_head.weight)
        nn.init.zeros_(self.text_head.weight)
        names = [NAME_TEMPLATE.format(n) for n in self.tower.class_names]
        self.register_buffer("class_name_embeddings", self._text.unit_embeddings(names, self.config.text.max_length),
                             persistent=False)

    @property
    def device(self) -> torch.device:
        return self.image_head.weight.device

    # -- features ---------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Mean-pooled tower features (B, H); no gradient into a locked tower."""
        pixel_values = pixel_values.to(self.device)
        if self.config.lock_image:
            with torch.no_grad():
                return self.tower(pixel_values).float().mean(1)
        return self.tower.encode(pixel_values).float().mean(1)

    def embed_image_features(self, pooled: torch.Tensor) -> torch.Tensor:
        pooled = pooled.to(self.device).float()
        out = self.image_head(pooled)
        if self.config.image_prior == "label-space":
            out = out + conse(self.tower.pooled_class_probs(pooled), self.class_name_embeddings)
        return F.normalize(out, dim=-1)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        pooled = self._text.pooled(texts, self.config.text.max_length, self.device).float()
        out = self.text_head(pooled)
        if self.config.image_prior == "label-space":
            out = out + F.normalize(pooled, dim=-1)
        return F.normalize(out, dim=-1)

    def loss(self, pooled_images: torch.Tensor, texts: Sequence[str], labels: torch.Tensor | None = None,
             hard_negatives: int | None = None) -> torch.Tensor:
        return clip_loss(self.embed_image_features(pooled_images), self.embed_texts(texts), self.logit_scale(),
                         labels=labels, hard_negatives=hard_negatives)

    # -- inference --------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: Sequence[ImageInput], batch_size: int = 64) -> torch.Tensor:
        out = []
        for start in range(0, len(images), batch_size):
            pil = [load_image(img) for img in images[start:start + batch_size]]
            out.append(self.embed_image_features(self.image_features(self.tower.preprocess(pil))))
        return torch.cat(out) if out else torch.empty(0, self.config.embed_dim)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        out = [self.embed_texts(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.config.embed_dim)

    # -- saving -----------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What training changed: heads, temperature, and any unlocked encoder."""
        keep = ("image_head.", "text_head.", "logit_scale.")
        if not self.config.lock_text:
            keep += ("text_model.",)
        if not self.config.lock_image:
            keep += ("tower.",)
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if k.startswith(keep)}

    def save_pretrained(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        from llava_lite.atomic import atomic_dir

        with atomic_dir(path) as tmp:
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
            save_file(self.trainable_state(), str(tmp / WEIGHTS_NAME))
        return Path(path)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> DualEncoder:
        path = Path(path)
        cfg_file = path / CONFIG_NAME
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path}: not a dual encoder folder (no {CONFIG_NAME})")
        model = cls(DualEncoderConfig.load(cfg_file))
        model.load_weights(path)
        return model.eval()

    def load_weights(self, path: str | Path) -> None:
        """The trained weights of a saved folder into this model (loading and resuming)."""
        from safetensors.torch import load_file

        weights = Path(path) / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: the dual encoder's weights are missing")
        missing = set(self.trainable_state()) - set(state := load_file(str(weights)))
        if missing:
            raise ConfigError(f"{path}: weights missing for {sorted(missing)[:5]}; was it saved with this config?")
        self.load_state_dict(state, strict=False)


class HFCLIP:
    """A transformers `CLIPModel` folder behind the same interface as `DualEncoder`."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.model = CLIPModel.from_pretrained(path).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.image_processor = CLIPImageProcessor.from_pretrained(path)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp().clamp(max=100.0)

    @torch.no_grad()
    def encode_images(self, images: Sequence[ImageInput], batch_size: int = 64) -> torch.Tensor:
        out = []
        for start in range(0, len(images), batch_size):
            pil = [load_image(img) for img in images[start:start + batch_size]]
            pixels = self.image_processor(images=pil, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(F.normalize(_as_tensor(self.model.get_image_features(pixel_values=pixels)), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                   return_tensors="pt").to(self.device)
            out.append(F.normalize(_as_tensor(self.model.get_text_features(**batch)), dim=-1))
        return torch.cat(out)


def _as_tensor(features) -> torch.Tensor:
    # transformers 5 may return a model output with the projected embeddings as pooler_output
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def load_dual_encoder(path: str | Path) -> Any:
    """A llava-lite dual encoder folder, a transformers CLIPModel folder, or `label-space`: the
    untrained bridge through the default tower's ImageNet head (`llava_lite.label_space`)."""
    from llava_lite.label_space import LABEL_SPACE, LabelSpaceEncoder

    if str(path) == LABEL_SPACE:
        return LabelSpaceEncoder()
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return DualEncoder.from_pretrained(path)
    cfg = path / "config.json"
    if cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "clip":
        return HFCLIP(path)
    raise FileNotFoundError(f"{path}: neither a llava-lite dual encoder ({CONFIG_NAME}) nor a CLIPModel folder")
