"""The processor owns text and image preprocessing; the model owns tensors.

Every way in (the API, the serving engine, training) goes through it: `load` splits inline
images out of the messages, loads, validates and hashes each image once and checks the
placeholders; `encode` renders the chat template once and tokenizes; `collate_training` pads
training packs. `processor(messages, images)` does all of it for one prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import BatchFeature

from llava_lite.config import LlavaLiteConfig
from llava_lite.image_cache import image_key
from llava_lite.images import MAX_FILE_BYTES, MAX_PIXELS, ImageInput, ImageLoadError, load_image
from llava_lite.label_bridge import bridged_messages
from llava_lite.prompting import IGNORE_INDEX, ConversationError, EncodedConversation, PromptBuilder, normalize_messages


@dataclass(frozen=True)
class ImageLimits:
    """What `LlavaLiteProcessor.load` accepts; the defaults are the image loader's own caps."""

    max_pixels: int = MAX_PIXELS
    max_file_bytes: int = MAX_FILE_BYTES


@dataclass
class LoadedConversation:
    """A conversation with its images loaded: text-only messages (images as placeholders), the
    RGB images in placeholder order and each image's content hash (cache key)."""

    messages: list[dict[str, str]]
    images: list[Image.Image]
    keys: list[str]


class ImageSourceError(ImageLoadError):
    """An image of a request could not be loaded; `source` is the input that failed."""

    def __init__(self, message: str, source: ImageInput) -> None:
        super().__init__(message)
        self.source = source


def split_inline_images(messages: Sequence[dict[str, Any]],
                        images: Sequence[ImageInput] | None) -> tuple[list[dict[str, Any]], list[ImageInput]]:
    """Pull images out of content parts ({"type": "image", "image": X}) in order."""
    found: list[ImageInput] = []
    clean = []
    for msg in messages:
        content = msg.get("content", msg.get("value")) if isinstance(msg, dict) else None
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image" and "image" in part:
                    found.append(part["image"])
                    parts.append({"type": "image"})
                else:
                    parts.append(part)
            msg = {**msg, "content": parts}
        clean.append(msg)
    if images and found:
        raise ConversationError("give images either inline in content parts or via images=, not both")
    return clean, list(images or []) + found


def add_image_token(tokenizer, image_token: str) -> int:
    """Register the image placeholder as one special token and return its id.

    The id may lie past the LLM's embedding table; the model never looks it up.
    """
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]}, replace_extra_special_tokens=False)
    ids = tokenizer(image_token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"image token {image_token!r} does not tokenize to one id (got {ids})")
    return ids[0]


class LlavaLiteProcessor:
    """Builds model inputs: token ids, labels and pixel values.

    Batches are left-padded for generation and right-padded for training.
    """

    def __init__(
        self,
        config: LlavaLiteConfig,
        tokenizer,
        num_image_tokens: int,
        image_preprocess: Callable[[list[Image.Image]], torch.Tensor],
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.image_token_id = add_image_token(tokenizer, config.image_token)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_token_id = tokenizer.pad_token_id
        self.num_image_tokens = num_image_tokens
        self.image_preprocess = image_preprocess
        self.prompts = PromptBuilder(
            tokenizer,
            image_token=config.image_token,
            image_token_id=self.image_token_id,
            num_image_tokens=num_image_tokens,
            max_length=config.max_length,
            system_prompt=config.system_prompt,
            content_format=config.chat_content_format,
        )

    def load_images(self, images: Sequence[ImageInput], limits: ImageLimits | None = None) -> list[Image.Image]:
        """RGB images; ImageSourceError names the input that could not be loaded."""
        limits = limits or ImageLimits()
        loaded = []
        for img in images:
            try:
                loaded.append(load_image(img, max_pixels=limits.max_pixels, max_file_bytes=limits.max_file_bytes))
            except ImageLoadError as err:
                raise ImageSourceError(str(err), img) from err
        return loaded

    def load(self, messages: Sequence[dict[str, Any]], images: Sequence[ImageInput] | None = None,
             limits: ImageLimits | None = None) -> LoadedConversation:
        """Split inline images out of `messages`, load and hash each image once and check that
        the placeholders match them (ConversationError, ImageLoadError)."""
        messages, sources = split_inline_images(messages, images)
        messages = normalize_messages(messages, self.config.image_token)
        self.check_image_count(messages, len(sources))
        loaded = self.load_images(sources, limits)
        return LoadedConversation(messages, loaded, [image_key(img) for img in loaded])

    def encode(self, conversation: LoadedConversation, *, image_texts: Sequence[str | None] | None = None,
               max_new_tokens: int = 0) -> list[int]:
        """The prompt's token ids (template rendered once). `image_texts[i]`, where not None,
        stands in for image i as text (the label bridge), and that image's tokens are left out."""
        messages = conversation.messages
        if image_texts is not None and any(t is not None for t in image_texts):
            messages = bridged_messages(messages, image_texts, self.config.image_token)
        return self.encode_prompt(messages, max_new_tokens=max_new_tokens)

    def __call__(self, messages: Sequence[dict[str, Any]], images: Sequence[ImageInput] | None = None, *,
                 max_new_tokens: int = 0, limits: ImageLimits | None = None) -> BatchFeature:
        """One prompt as model input: `input_ids`, `attention_mask`, `pixel_values` (when there
        are images) and `image_keys`. Images go in as tokens (no label bridge; `LlavaLite.prepare`
        applies it)."""
        conversation = self.load(messages, images, limits)
        ids = torch.tensor([self.encode(conversation, max_new_tokens=max_new_tokens)], dtype=torch.long)
        data: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                "image_keys": conversation.keys}
        if conversation.images:
            data["pixel_values"] = self.image_preprocess(conversation.images)
        return BatchFeature(data)

    def pixel_values(self, images: Sequence[ImageInput]) -> torch.Tensor:
        return self.image_preprocess(self.load_images(images))

    def check_image_count(self, messages: Sequence[dict[str, Any]], num_images: int) -> None:
        expected = self.prompts.count_images(messages)
        if expected != num_images:
            raise ConversationError(
                f"the conversation has {expected} {self.config.image_token} placeholder(s) "
                f"but {num_images} image(s) were given"
            )

    def encode_training(self, messages: Sequence[dict[str, Any]]) -> EncodedConversation:
        return self.prompts.encode_conversation(messages)

    def encode_prompt(self, messages: Sequence[dict[str, Any]], max_new_tokens: int = 0) -> list[int]:
        return self.prompts.encode_prompt(messages, max_new_tokens=max_new_tokens)

    def pad(
        self, sequences: Sequence[list[int]], side: str, value: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad to a (batch, max_len) tensor plus attention mask."""
        value = self.pad_token_id if value is None else value
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), value, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            if side == "left":
                ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
                mask[row, width - len(seq):] = 1
            else:
                ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                mask[row, : len(seq)] = 1
        return ids, mask

    def collate_training(self, encoded: Sequence[EncodedConversation], images: Sequence[ImageInput] = (),
                         positions: Sequence[list[int]] | None = None) -> dict[str, torch.Tensor]:
        """A right-padded training batch; `pixel_values` for `images` (in placeholder order
        over the rows) and `position_ids` when the rows carry their own positions (packs)."""
        input_ids, attention_mask = self.pad([e.input_ids for e in encoded], side="right")
        labels, _ = self.pad([e.labels for e in encoded], side="right", value=IGNORE_INDEX)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if positions is not None:
            batch["position_ids"] = self.pad(positions, side="right", value=0)[0]
        if images:
            batch["pixel_values"] = self.pixel_values(images)
        return batch
