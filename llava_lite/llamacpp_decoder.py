"""llama.cpp as the CPU decoder: the tower, projector and bridge stay in torch; the merged LLM
runs in llama.cpp (through llama-cpp-python), fed the prompt as input embeddings.

Why: on a CPU, llama.cpp's int8 and f32 matmuls and its lean decode loop are several times
faster per token than transformers' `generate` (`llava-lite bench` prints the ratio). The LLM
is exported once with `export-gguf`'s writer into a cache keyed by its weights' content.

One conversation at a time, with its KV cache kept: a follow-up turn whose prompt starts with
the previous prompt and reply only prefills the new part.
"""

from __future__ import annotations

import ctypes
import hashlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from llava_lite.config import ConfigError


def weights_digest(llm) -> str:
    """A content hash of the LLM's weights: the cache key of its GGUF (~1 s next to an export's ~10)."""
    h = hashlib.sha256()
    for name, tensor in sorted(llm.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().float().contiguous().numpy().data)
    return h.hexdigest()[:16]


def gguf_for(llm, tokenizer, chat_template: str, type_name: str, cache: Path) -> Path:
    """The LLM's GGUF in `cache`, written on first use."""
    from llava_lite.gguf_llm import outtype, write_llm_gguf

    path = cache / f"llm-{weights_digest(llm)}-{type_name}.gguf"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        write_llm_gguf(llm, tokenizer, chat_template, path, outtype(type_name))
    return path


class LlamaCppDecoder:
    """Input-embedding prompts decoded in llama.cpp, in up to `slots` sequences at once.

    Each slot keeps its KV cache and what each position holds (a token id or an image-row
    key), so a prompt that continues a slot's conversation only prefills its new part.
    `generate` runs one sequence in slot 0; the server's batcher uses `prefill` and `step`.
    """

    def __init__(self, gguf_path: Path, n_ctx: int, n_threads: int | None = None, slots: int = 1,
                 exact_kv: bool = True) -> None:
        try:
            import llama_cpp
        except ImportError as err:
            raise ConfigError("the llama.cpp decoder needs llama-cpp-python: make llamacpp "
                              "(or pip install 'llava-lite[llamacpp]')") from err
        llama_cpp.llama_backend_init()
        self.gguf_path = Path(gguf_path)
        self._model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(),
                                                           llama_cpp.llama_model_default_params())
        if not self._model:
            raise ConfigError(f"{gguf_path}: llama.cpp could not load this GGUF")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = n_ctx * slots, 512, 512, slots
        params.n_threads = params.n_threads_batch = n_threads or torch.get_num_threads()
        if exact_kv:
            # f32 KV cache and no flash attention (its CPU kernel rounds K and V to f16): either
            # moves logits by ~1e-3, enough to flip near-tied greedy picks against torch
            params.type_k = params.type_v = 0
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise ConfigError(f"llama.cpp could not make a context of {n_ctx} x {slots} positions")
        self.n_embd = llama_cpp.llama_model_n_embd(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
        self.n_ctx = n_ctx  # per slot
        self.slots: list[list] = [[] for _ in range(slots)]  # what each slot's KV positions hold
        self.last_prefill = 0  # positions the last prompt actually ran (the rest were reused)
        self._lock = threading.Lock()

    def close(self) -> None:
        import llama_cpp

        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            self._ctx = self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have unloaded the library
            pass

    def reset(self) -> None:
        """Forget every slot's KV cache (the next prompt prefills from scratch)."""
        import llama_cpp

        with self._lock:
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
            self.slots = [[] for _ in self.slots]

    def _decode(self, rows: list[tuple[int, int]], embeds: np.ndarray | None = None,
                tokens: list[int] | None = None, logits_at: set[int] | None = None) -> None:
        """One llama_decode over (slot, position) `rows`, fed input `embeds` or `tokens`."""
        import llama_cpp

        n = len(rows)
        batch = llama_cpp.llama_batch_init(n, 0 if embeds is None else self.n_embd, 1)
        try:
            batch.n_tokens = n
            for i, (slot, pos) in enumerate(rows):
                batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = pos, 1, slot
                batch.logits[i] = i in logits_at if logits_at is not None else i == n - 1
                if tokens is not None:
                    batch.token[i] = tokens[i]
            if embeds is not None:
                embeds = np.ascontiguousarray(embeds, dtype=np.float32)
                ctypes.memmove(batch.embd, embeds.ctypes.data, embeds.nbytes)
            if llama_cpp.llama_decode(self._ctx, batch) != 0:
                raise RuntimeError(f"llama.cpp could not decode {n} positions")
        finally:
            llama_cpp.llama_batch_free(batch)

    def shared_prefix(self, slot: int, keys: list) -> int:
        """How many leading positions of slot `slot` already hold `keys` (the last never counts:
        it must run for its logits)."""
        keep = 0
        for a, b in zip(self.slots[slot], keys[:-1], strict=False):
            if a != b:
                break
            keep += 1
        return keep

    def prefill(self, slot: int, embeds: np.ndarray, keys: list) -> torch.Tensor:
        """Bring `slot`'s KV cache to `keys` (keeping the prefix already there); the logits of
        the last position."""
        import llama_cpp

        if len(keys) >= self.n_ctx:
            raise ConfigError(f"prompt of {len(keys)} positions does not fit llama.cpp's context of {self.n_ctx}")
        keep = self.shared_prefix(slot, keys)
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx), slot, keep, -1)
        self.slots[slot] = self.slots[slot][:keep]
        self.last_prefill = len(keys) - keep
        for start in range(keep, len(keys), 512):
            chunk = embeds[start:start + 512]
            self._decode([(slot, start + i) for i in range(len(chunk))], embeds=chunk)
        self.slots[slot] = list(keys)
        return self.logits(-1)

    def step(self, slot_tokens: list[tuple[int, int]]) -> torch.Tensor:
        """Append one token to each listed slot in one forward pass; (rows, vocab) logits."""
        rows = [(slot, len(self.slots[slot])) for slot, _ in slot_tokens]
        self._decode(rows, tokens=[t for _, t in slot_tokens], logits_at=set(range(len(rows))))
        for slot, token in slot_tokens:
            self.slots[slot].append(token)
        return torch.stack([self.logits(i) for i in range(len(rows))])

    def logits(self, i: int) -> torch.Tensor:
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self._ctx, i)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())

    def room(self, slot: int) -> int:
        return self.n_ctx - len(self.slots[slot])

    def generate(self, embeds: np.ndarray, keys: list, max_new_tokens: int, eos_ids: set[int],
                 pick: Callable[[torch.Tensor], int]) -> Iterator[int]:
        """Yield new tokens for a prompt given as (positions, hidden) input embeddings, in slot 0;
        `keys` names each position for KV reuse; `pick` turns logits into the next token."""
        if embeds.shape[-1] != self.n_embd:
            raise ConfigError(f"embeddings of width {embeds.shape[-1]} for an LLM of width {self.n_embd}")
        with self._lock:
            logits = self.prefill(0, embeds, keys)
            for _ in range(max_new_tokens):
                token = pick(logits)
                yield token
                if token in eos_ids or self.room(0) <= 1:
                    return
                logits = self.step([(0, token)])[0]


def greedy(logits: torch.Tensor) -> int:
    return int(torch.argmax(logits))


def sampler(temperature: float, top_p: float, seed: int | None = None) -> Callable[[torch.Tensor], int]:
    """transformers' own temperature and top-p warpers, then one multinomial draw."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    warpers = [TemperatureLogitsWarper(max(temperature, 1e-5))]
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    gen = torch.Generator()
    if seed is not None:
        gen.manual_seed(seed)

    def pick(logits: torch.Tensor) -> int:
        scores = logits[None].float()
        for warp in warpers:
            scores = warp(None, scores)
        return int(torch.multinomial(torch.softmax(scores, -1), 1, generator=gen))

    return pick
