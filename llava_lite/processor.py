"""The processor owns text and image preprocessing; the model owns tensors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from llava_lite.config import LlavaLiteConfig
from llava_lite.images import ImageInput, load_image
from llava_lite.prompting import IGNORE_INDEX, ConversationError, EncodedConversation, PromptBuilder


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

    def load_images(self, images: Sequence[ImageInput]) -> list[Image.Image]:
        return [load_image(img) for img in images]

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

    def collate_training(self, encoded: Sequence[EncodedConversation]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = self.pad([e.input_ids for e in encoded], side="right")
        labels, _ = self.pad([e.labels for e in encoded], side="right", value=IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
