"""`LlavaLite.chat` on the llama.cpp decoder (`quantize="llamacpp-q8_0"` and friends).

The prompt is built exactly as for torch generation (template, images, label-bridge tokens);
only the LLM's forward passes move to llama.cpp.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from llava_lite.config import LLAMACPP_MODES, ConfigError
from llava_lite.llamacpp_decoder import LlamaCppDecoder, gguf_for, greedy, sampler
from llava_lite.streaming import reply_chunks

# generate() options this path honours; anything else is refused rather than ignored
SUPPORTED = {"max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p", "eos_token_id",
             "pad_token_id"}


def attach(lite, mode: str) -> str:
    """Merge LoRA, export the LLM to the GGUF cache (once) and decode with llama.cpp."""
    from llava_lite.gguf_export import gguf_chat_template
    from llava_lite.lora import is_peft
    from llava_lite.packaged import cache_dir

    if mode not in LLAMACPP_MODES:
        raise ConfigError(f"unknown llama.cpp mode {mode!r}; choose one of {sorted(LLAMACPP_MODES)}")
    if lite.device.type != "cpu":
        raise ConfigError(f"{mode} is a CPU decoder; on CUDA use 'bnb-8bit'")
    if is_peft(lite.model.llm):
        lite.merge_lora()
    template = gguf_chat_template(lite.processor, lite.config)
    path = gguf_for(lite.model.llm, lite.processor.tokenizer, template, LLAMACPP_MODES[mode], cache_dir() / "gguf")
    # f32 is the mode that matches torch (f32 KV, no flash attention); f16 and q8_0 are for
    # speed and take llama.cpp's own defaults (f16 KV, flash attention where it helps)
    lite.decoder = LlamaCppDecoder(path, n_ctx=lite.config.max_length, n_threads=torch.get_num_threads(),
                                   exact_kv=mode == "llamacpp-f32")
    return mode


def prompt_inputs(lite, ids: list[int], embeds, keys: list[str]) -> tuple[np.ndarray, list]:
    """(input embeddings as float32 rows, what each position holds) for a prepared prompt."""
    with torch.no_grad():
        rows = lite.model.embed(torch.tensor([ids]), embeds)[0].float().cpu().numpy()
    per_image = 0 if embeds is None else embeds.shape[1]
    return rows, position_keys(ids, lite.processor.image_token_id, keys, per_image)


def position_keys(ids: list[int], image_token_id: int, image_keys: list[str], per_image: int) -> list:
    """What each prompt position holds, for KV reuse: a token id, or (image key, row)."""
    keys: list = []
    seen = 0
    for token in ids:
        if token == image_token_id:
            keys.append((image_keys[seen // per_image], seen % per_image))
            seen += 1
        else:
            keys.append(token)
    return keys


def _picker(kwargs: dict[str, Any], eos: set[int]):
    pick = sampler(kwargs["temperature"], kwargs.get("top_p", 1.0)) if kwargs.get("do_sample") else greedy
    min_new = kwargs.get("min_new_tokens", 0)
    count = [0]

    def choose(logits: torch.Tensor) -> int:
        if count[0] < min_new:
            logits[list(eos)] = float("-inf")
        count[0] += 1
        return pick(logits)

    return choose


def tokens(lite, ids: list[int], embeds, keys: list[str], kwargs: dict[str, Any]) -> Iterator[int]:
    """New token ids for a prepared prompt (from `LlavaLite.prepare`)."""
    unknown = set(kwargs) - SUPPORTED
    if unknown:
        raise ConfigError(f"the llama.cpp decoder does not support {sorted(unknown)}")
    eos = kwargs.get("eos_token_id")
    eos = set(eos) if isinstance(eos, (list, tuple)) else {eos} - {None}
    prompt, pos = prompt_inputs(lite, ids, embeds, keys)
    yield from lite.decoder.generate(prompt, pos, kwargs["max_new_tokens"], eos, _picker(kwargs, eos))


def reply(lite, ids, embeds, keys, kwargs) -> str:
    out = [t for t in tokens(lite, ids, embeds, keys, kwargs)]
    return lite.processor.tokenizer.decode(out, skip_special_tokens=True).strip()


def stream(lite, ids, embeds, keys, kwargs) -> Iterator[str]:
    """Text chunks as tokens arrive; a byte-level token that ends mid-character waits for the
    next one. Closing the generator stops decoding at the next token."""

    def chunks() -> Iterator[str]:
        out: list[int] = []
        shown = ""
        for token in tokens(lite, ids, embeds, keys, kwargs):
            out.append(token)
            text = lite.processor.tokenizer.decode(out, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue
            yield text[len(shown):]
            shown = text

    yield from reply_chunks(chunks())
