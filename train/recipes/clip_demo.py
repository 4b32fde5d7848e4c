"""LiT on CPU: a frozen EfficientNet-Lite0 (ImageNet) and the packaged all-MiniLM-L6-v2,
trained to agree on easy-VQA captions, generated scene captions and Fashion-MNIST class
captions. Three Fashion-MNIST classes never appear in training: the zero-shot test."""

from llava_lite.config import VisionConfig
from llava_lite.dual_encoder import DualEncoderConfig, TextEncoderConfig
from llava_lite.train.clip_recipe import ClipRecipe


def recipe() -> ClipRecipe:
    return ClipRecipe(
        name="clip-demo",
        model=DualEncoderConfig(
            vision=VisionConfig(name="efficientnet-lite0", feature_strategy="patch"),
            text=TextEncoderConfig(name="minilm", max_length=48),
            embed_dim=256, lock_image=True, lock_text=False,
        ),
        caption_sets=[{"name": "easyvqa-captions", "args": {}}, {"name": "scenes-captions", "args": {"n": 1000}}],
        fashion_per_class=600,
        held_out_classes=["sneaker", "bag", "trouser"],
        caption_templates=["a photo of a {}.", "a black and white photo of a {}.", "a low resolution photo of a {}.",
                           "a {} on a dark background.", "a picture of a {}.", "a grayscale image of a {}."],
        steps=300, batch_size=128, lr=1e-3, text_lr=3e-5,
    )
