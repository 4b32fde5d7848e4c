"""The Python API: `LlavaLite.from_pretrained()`, then caption, ask, chat and their batched forms."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from llava_lite.checkpoint import build_model, is_checkpoint, load_checkpoint, load_model_folder, save_checkpoint
from llava_lite.config import LLAMACPP_MODES, LlavaLiteConfig
from llava_lite.image_cache import ImageEmbedCache, image_key
from llava_lite.image_views import ImageView, PreparedPrompt, image_views, prepared_prompt
from llava_lite.images import ImageInput
from llava_lite.label_bridge import ImageEvidence
from llava_lite.llm import output_cache, with_cache
from llava_lite.lora import is_peft
from llava_lite.modeling import LlavaLiteModel
from llava_lite.processor import ImageLimits, LlavaLiteProcessor
from llava_lite.prompt_cache import PromptCache, common_prefix_len
from llava_lite.streaming import StopOnEvent, reply_chunks

CAPTION_PROMPT = "Describe the image in one sentence."
DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "demo-model"

Messages = Sequence[dict[str, Any]]


def default_model_path() -> Path | None:
    """The committed demo checkpoint, if this install carries one."""
    return DEFAULT_MODEL_DIR if is_checkpoint(DEFAULT_MODEL_DIR) else None


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


class LlavaLite:
    """A ready-to-use visual assistant: a model, its processor and generation helpers."""

    def __init__(self, model: LlavaLiteModel, processor: LlavaLiteProcessor, source: str = "") -> None:
        self.model = model
        self.processor = processor
        self.source = source
        self.quantization = "none"
        self.decoder = None  # a LlamaCppDecoder once quantize("llamacpp-...") is called
        self.image_cache = ImageEmbedCache()
        self._tower_lock = threading.Lock()
        # The KV cache of recent conversations, so a follow-up turn only runs its new tokens.
        self.prompt_cache = PromptCache(processor.image_token_id, capacity=4)

    # -- loading and saving ----------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        quantize: str | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        merge: bool = True,
    ) -> LlavaLite:
        """Load a llava-lite checkpoint folder, a transformers Llava folder or Hub id, or (with
        no path) the default model that ships with llava-lite.

        quantize: None/"none", "8bit" or "4bit" (see `llava_lite.quantize`).
        merge: fold a LoRA adapter into the LLM weights, for inference at the base LLM's speed
            (an unmerged adapter costs two extra matmuls in every adapted layer, every token).
            `merge=False` keeps it separate, e.g. to save an adapter-only checkpoint again.
        """
        torch_dtype = _resolve_dtype(dtype)
        if path is None:
            default = default_model_path()
            if default is not None:
                model, processor = load_checkpoint(default, dtype=torch_dtype)
                source = "default (demo checkpoint)"
            else:
                # No trained demo checkpoint in this install: real parts, fresh projector.
                model, processor = build_model(LlavaLiteConfig(), dtype=torch_dtype)
                source = "default (untrained projector)"
        else:
            model, processor = load_model_folder(path, dtype=torch_dtype)
            source = str(path)
        obj = cls(model, processor, source)
        if device is not None:
            obj.model.to(device)
        if quantize not in (None, "none"):
            obj.quantize(quantize)  # merges first
        elif merge and is_peft(obj.model.llm):
            obj.merge_lora()
        return obj

    @classmethod
    def from_config(cls, config: LlavaLiteConfig, *, source: str = "from_config",
                    dtype: str | torch.dtype | None = None, seed: int = 0) -> LlavaLite:
        """An untrained model from a config: pretrained tower and LLM, a projector initialised
        from `seed`, and a fresh (zero-effect) LoRA adapter if `config.lora.enabled`. Without
        images it chats as the base LLM does, which is what base-vs-trained comparisons need."""
        return cls(*build_model(config, dtype=_resolve_dtype(dtype), seed=seed), source=source)

    def save_pretrained(self, path: str | Path) -> Path:
        return save_checkpoint(self.model, path, tokenizer=self.processor.tokenizer)

    def merge_lora(self) -> LlavaLite:
        """Fold the LoRA adapter into the LLM weights (faster inference; saving then writes
        the full LLM into the checkpoint)."""
        if not is_peft(self.model.llm):
            raise ValueError("this model has no LoRA adapter to merge")
        self.model.llm = self.model.llm.merge_and_unload()
        self.prompt_cache.clear()
        self.model.config.lora.enabled = False
        self.model.config.llm_subfolder = "llm"
        return self

    def quantize(self, mode: str) -> LlavaLite:
        """Quantize the LLM for inference (`8bit`, `4bit` or a `llava_lite.quantize` backend), or with a `llamacpp-*`
        mode decode in llama.cpp instead (chat, ask and caption; batches stay in torch)."""
        if mode in LLAMACPP_MODES:
            from llava_lite.llamacpp_chat import attach

            self.quantization = attach(self, mode)
            return self
        from llava_lite.quantize import quantize_model

        self.quantization = quantize_model(self, mode)
        self.prompt_cache.clear()  # keys and values of the old weights
        return self

    @property
    def config(self) -> LlavaLiteConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- images ----------------------------------------------------------------------
    def encode_images(self, images: Sequence[ImageInput]) -> torch.Tensor | None:
        """Projected embeddings for `images`, each computed once and then served from cache."""
        views = self.image_views(images)
        return torch.stack([v.embed for v in views]) if views else None

    def image_views(self, images: Sequence[ImageInput]) -> list[ImageView]:
        """Each image through the tower once (then from cache): its projected embeddings, the
        head's evidence and, with the label bridge on, the text that stands in for it when the
        domain gate puts it outside the training images."""
        loaded = self.processor.load_images(images)
        return self._views(loaded, [image_key(img) for img in loaded])

    def _views(self, images: Sequence, keys: Sequence[str]) -> list[ImageView]:
        with self._tower_lock:  # request threads of a server share the tower and its cache
            return image_views(self.model, self.processor, self.image_cache, images, keys)

    def evidence(self, image: ImageInput) -> ImageEvidence | None:
        """The tower head's top classes for `image` and whether the domain gate puts it outside
        the training images (always False without a fitted gate); None for CLIP towers."""
        return self.image_views([image])[0].evidence

    def describe_evidence(self, image: ImageInput, k: int = 5) -> list[tuple[str, float]] | None:
        """What the tower's own classifier head sees in `image`: its top `k` (at most 5)
        classes with their probabilities, e.g. [("Egyptian Mau", 0.76), ("tabby cat", 0.11),
        ...]; None for a tower without a head (CLIP)."""
        found = self.evidence(image)
        return None if found is None else found.classes[:k]

    # -- generation ------------------------------------------------------------------
    def _gen_kwargs(self, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                    do_sample: bool | None = None, **extra) -> dict[str, Any]:
        if do_sample is None:
            do_sample = temperature > 0
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            "eos_token_id": self.processor.tokenizer.eos_token_id,
            "pad_token_id": self.processor.pad_token_id,
        }
        if do_sample:
            kwargs.update(temperature=max(temperature, 1e-5), top_p=top_p)
        kwargs.update(extra)
        return kwargs

    def prepare(self, messages: Messages, images: Sequence[ImageInput] | None = None, *, max_new_tokens: int = 0,
                limits: ImageLimits | None = None) -> PreparedPrompt:
        """A conversation made ready to generate from: its images loaded, hashed and through the
        tower once, the template rendered and tokenized once (`chat` and the server run this)."""
        conversation = self.processor.load(messages, images, limits)
        views = self._views(conversation.images, conversation.keys)
        return prepared_prompt(self.processor, conversation, views, max_new_tokens)

    def chat(
        self,
        messages: Messages,
        images: Sequence[ImageInput] | None = None,
        stream: bool = False,
        **gen,
    ) -> str | Iterator[str]:
        """Reply to a multi-turn conversation. With stream=True, yields text chunks.

        Messages are `{"role", "content"}` dicts; images go inline as content parts
        `{"type": "image", "image": X}` or as `<image>` placeholders plus `images=`.
        A follow-up turn reuses the previous turn's KV cache (see `llava_lite.prompt_cache`).
        """
        kwargs = self._gen_kwargs(**gen)
        prompt = self.prepare(messages, images, max_new_tokens=kwargs["max_new_tokens"])
        ids, embeds, keys = prompt.ids, prompt.embeds, prompt.keys
        if self.decoder is not None:
            from llava_lite import llamacpp_chat

            return (llamacpp_chat.stream if stream else llamacpp_chat.reply)(self, ids, embeds, keys, kwargs)
        input_ids = torch.tensor([ids], device=self.device)
        cache = self._take_cache(ids, keys)
        if not stream:
            with torch.no_grad():
                out = self.model.generate(input_ids, image_embeds=embeds, **with_cache(cache), **kwargs)
            self.prompt_cache.put(ids + out[0].tolist(), keys, cache)
            return self.processor.tokenizer.decode(out[0], skip_special_tokens=True).strip()
        return self._stream(input_ids, embeds, kwargs, cache, keys)

    def _take_cache(self, ids: list[int], keys: list[str]):
        from transformers import DynamicCache

        cache, _ = self.prompt_cache.take(ids, keys)
        return cache if cache is not None else DynamicCache(config=self.model.llm.config)

    def _stream(self, input_ids, embeds, kwargs, cache, keys) -> Iterator[str]:
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []
        generated: list[torch.Tensor] = []
        cancel = threading.Event()
        criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
        criteria.append(StopOnEvent(cancel))

        def run() -> None:
            try:
                with torch.no_grad():
                    generated.append(self.model.generate(
                        input_ids, image_embeds=embeds, streamer=streamer, stopping_criteria=criteria,
                        **with_cache(cache), **kwargs))
            except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
                errors.append(err)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            yield from reply_chunks(streamer)
        finally:
            # Reached early when the consumer stops reading (a Stop button, a closed
            # connection): end generation at the next token instead of running to the end.
            cancel.set()
            thread.join()
            if generated:
                self.prompt_cache.put(input_ids[0].tolist() + generated[0][0].tolist(), keys, cache)
        if errors:
            raise errors[0]

    def user_message(self, text: str, num_images: int = 1) -> dict[str, str]:
        """A user turn with `num_images` image placeholders before the text."""
        return {"role": "user", "content": f"{self.config.image_token}\n" * num_images + text}

    def ask(self, image: ImageInput, question: str, **gen) -> str | Iterator[str]:
        """Answer a question about one image (stream=True yields text chunks)."""
        return self.chat([self.user_message(question)], images=[image], **gen)

    def caption(self, image: ImageInput, **gen) -> str | Iterator[str]:
        return self.ask(image, CAPTION_PROMPT, **gen)

    def ask_batch(
        self, images: Sequence[ImageInput], questions: Sequence[str], batch_size: int = 8, **gen
    ) -> list[str]:
        """Answer one question per image, `batch_size` at a time (left-padded generation)."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        if self.decoder is not None:  # llama.cpp runs one sequence; its KV prefix reuse still applies
            return [self.ask(img, q, **gen) for img, q in zip(images, questions, strict=True)]
        kwargs = self._gen_kwargs(**gen)
        answers: list[str] = []
        tok = self.processor.tokenizer
        for start in range(0, len(images), batch_size):
            convs = [self.processor.load([self.user_message(q)], [img]) for img, q in
                     zip(images[start:start + batch_size], questions[start:start + batch_size], strict=True)]
            views = self._views([c.images[0] for c in convs], [c.keys[0] for c in convs])
            rows = [prepared_prompt(self.processor, c, [v], kwargs["max_new_tokens"])
                    for c, v in zip(convs, views, strict=True)]
            input_ids, mask = self.processor.pad([r.ids for r in rows], side="left")
            kept = [r.embeds for r in rows if r.embeds is not None]
            embeds = torch.cat(kept) if kept else None
            out = self.model.generate(
                input_ids.to(self.device), attention_mask=mask.to(self.device), image_embeds=embeds, **kwargs
            )
            answers.extend(tok.decode(row, skip_special_tokens=True).strip() for row in out)
        return answers

    @torch.no_grad()
    def ask_many(self, image: ImageInput, questions: Sequence[str], max_new_tokens: int = 32) -> list[str]:
        """Greedy answers to several questions about one image.

        The prompt prefix the questions share (system prompt, image block, any common text)
        runs once; its KV cache is then copied to every question and the different suffixes
        decode as one batch. The answers equal `ask(image, q)` for each question, at a
        fraction of the prefill cost.
        """
        if not questions:
            return []
        if self.decoder is not None:  # one sequence at a time; the shared image prefix is kept
            return [self.ask(image, q, max_new_tokens=max_new_tokens, do_sample=False) for q in questions]
        view = self.image_views([image])[0]
        if view.bridge_text is not None:  # no shared image block to reuse
            return self.ask_batch([image] * len(questions), questions, max_new_tokens=max_new_tokens)
        prompts = [self.processor.encode_prompt([self.user_message(q)], max_new_tokens=max_new_tokens)
                   for q in questions]
        shared = min(common_prefix_len(*prompts), min(len(p) for p in prompts) - 1)  # rows keep >= 1 own token
        head = torch.tensor([prompts[0][:shared]], device=self.device)
        # The shared prefix holds the whole image block (questions follow the image), so the
        # image embeddings are scattered into the prefix only.
        if int((head == self.processor.image_token_id).sum()) != self.processor.num_image_tokens:
            return self.ask_batch([image] * len(questions), questions, max_new_tokens=max_new_tokens)
        head_embeds = self.model.embed(head, view.embed[None])
        llm = self.model.llm
        out = llm(inputs_embeds=head_embeds, use_cache=True)
        cache = output_cache(out)
        cache.batch_repeat_interleave(len(prompts))
        tails = [p[shared:] for p in prompts]
        width = max(len(t) for t in tails)
        pad = self.processor.pad_token_id
        ids = torch.full((len(tails), width), pad, dtype=torch.long, device=self.device)
        mask = torch.zeros((len(tails), shared + width), dtype=torch.long, device=self.device)
        mask[:, :shared] = 1
        for row, tail in enumerate(tails):  # left-pad the tails: pads sit between prefix and tail
            ids[row, width - len(tail):] = torch.tensor(tail)
            mask[row, shared + width - len(tail):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        eos = self.processor.tokenizer.eos_token_id
        done = torch.zeros(len(tails), dtype=torch.bool, device=self.device)
        generated: list[torch.Tensor] = []
        step_ids, step_pos = ids, positions[:, shared:]
        for _ in range(max_new_tokens):
            out = llm(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True,
                      **with_cache(cache))
            cache = output_cache(out)
            nxt = out.logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            generated.append(nxt)
            done |= nxt == eos
            if bool(done.all()):
                break
            step_ids = nxt[:, None]
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        tokens = torch.stack(generated, dim=1)
        tok = self.processor.tokenizer
        return [tok.decode(row, skip_special_tokens=True).strip() for row in tokens]

    def caption_batch(self, images: Sequence[ImageInput], batch_size: int = 8, **gen) -> list[str]:
        return self.ask_batch(images, [CAPTION_PROMPT] * len(images), batch_size=batch_size, **gen)
