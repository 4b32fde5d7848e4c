"""The dual-encoder (CLIP-style) recipe: one contrastive stage on the training engine, a
dataclass saved with every run, overridable as key=value like the LLaVA recipes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llava_lite.config import ConfigError
from llava_lite.dual_encoder import DualEncoderConfig
from llava_lite.settings import Settings


@dataclass
class ClipRecipe(Settings):
    """Training data are captioned images: `caption_sets` are named LLaVA caption builders
    (their assistant turn is the caption); Fashion-MNIST adds class-label captions for every
    class except `held_out_classes`, which only the zero-shot test sees."""

    name: str = "clip-demo"
    model: DualEncoderConfig = field(default_factory=DualEncoderConfig)
    caption_sets: list[dict[str, Any]] = field(default_factory=list)  # {"name": ..., "args": {...}}
    fashion_per_class: int = 0
    held_out_classes: list[str] = field(default_factory=list)
    caption_templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3  # heads and temperature
    text_lr: float = 3e-5  # the text encoder (when unlocked)
    tower_lr: float = 1e-5  # the image tower (when model.lock_image is false)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    hard_negatives: int | None = None
    seed: int = 0
    feature_batch_size: int = 64
    precision: str = "fp32"  # or auto / bf16 / fp16, as in the LLaVA recipes
    save_every: int = 50
    keep_last: int = 2
    num_threads: int | None = None
    report_to: str = "none"
    # evaluation at the end
    eval_zero_shot: bool = True
    probe_shots: list[int] = field(default_factory=lambda: [16, 0])  # 0 = every training image
    retrieval_set: str | None = "easyvqa-test"

    def validate(self) -> ClipRecipe:
        self.model.validate()
        from llava_lite.data.fashion_mnist import CLASSES

        unknown = [c for c in self.held_out_classes if c not in CLASSES]
        if unknown:
            raise ConfigError(f"held_out_classes {unknown} are not Fashion-MNIST classes {list(CLASSES)}")
        from llava_lite.train.recipe import PRECISIONS, REPORT_TO

        if self.precision not in PRECISIONS or self.report_to not in REPORT_TO:
            raise ConfigError(f"precision={self.precision!r} (use {PRECISIONS}), "
                              f"report_to={self.report_to!r} (use {REPORT_TO})")
        if self.save_every < 1 or self.keep_last < 1:
            raise ConfigError("save_every and keep_last must be positive")
        if min(self.lr, self.text_lr, self.tower_lr) <= 0 or not 0 <= self.warmup_ratio < 1:
            raise ConfigError("learning rates must be > 0 and 0 <= warmup_ratio < 1")
        if self.steps < 1 or self.batch_size < 2:
            raise ConfigError("steps must be >= 1 and batch_size >= 2 (contrastive needs negatives)")
        if not self.caption_sets and not self.fashion_per_class:
            raise ConfigError("no training data: give caption_sets or fashion_per_class")
        if any("{}" not in t for t in self.caption_templates):
            raise ConfigError("every caption template needs '{}' for the class name")
        return self
