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

# exact mode names -> the GGUF storage type of the LLM's matrices
MODES = {"llamacpp-f32": "f32", "llamacpp-f16": "f16", "llamacpp-q8_0": "q8_0"}


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
    """Greedy or sampled decoding of input embeddings in llama.cpp, one sequence at a time."""

    def __init__(self, gguf_path: Path, n_ctx: int, n_threads: int | None = None) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as err:
            raise ConfigError("the llama.cpp decoder needs llama-cpp-python: make llamacpp "
                              "(or pip install 'llava-lite[llamacpp]')") from err
        # f32 KV cache: llama.cpp's default f16 cache moves logits by ~1e-3, enough to flip
        # near-tied greedy picks against the torch reference
        self.gguf_path = Path(gguf_path)
        self.llama = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=n_threads, n_batch=512,
                           type_k=0, type_v=0, verbose=False)
        self.n_embd = self.llama.n_embd()
        self.n_vocab = self.llama.n_vocab()
        self.n_ctx = n_ctx
        self._keys: list = []  # what each KV position holds (token id or image-row key)
        self.last_prefill = 0  # positions the last prompt actually ran (the rest were reused)
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Forget the KV cache (the next prompt prefills from scratch)."""
        import llama_cpp

        with self._lock:
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx()), True)
            self._keys = []

    def _ctx(self):
        return self.llama._ctx.ctx

    def _decode(self, start: int, rows: np.ndarray | None = None, token: int | None = None) -> None:
        """Run input-embedding `rows` (n, hidden), or one `token`, at positions from `start`."""
        import llama_cpp

        n = 1 if rows is None else len(rows)
        batch = llama_cpp.llama_batch_init(n, 0 if rows is None else self.n_embd, 1)
        try:
            batch.n_tokens = n
            for i in range(n):
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == n - 1
            if rows is None:
                batch.token[0] = token
            else:
                rows = np.ascontiguousarray(rows, dtype=np.float32)
                ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)
            if llama_cpp.llama_decode(self._ctx(), batch) != 0:
                raise RuntimeError(f"llama.cpp could not decode {n} positions at {start}")
        finally:
            llama_cpp.llama_batch_free(batch)

    def _prefill(self, embeds: np.ndarray, keys: list) -> None:
        """Bring the KV cache to `keys`, keeping the longest prefix already there."""
        import llama_cpp

        if len(keys) >= self.n_ctx:
            raise ConfigError(f"prompt of {len(keys)} positions does not fit llama.cpp's context of {self.n_ctx}")
        keep = 0
        # the last position always runs, for its logits
        for a, b in zip(self._keys, keys[:-1], strict=False):
            if a != b:
                break
            keep += 1
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx()), 0, keep, -1)
        self._keys = self._keys[:keep]
        self.last_prefill = len(keys) - keep
        for start in range(keep, len(keys), 512):
            self._decode(start, rows=embeds[start:start + 512])
        self._keys = list(keys)

    def _step(self, token: int) -> None:
        self._decode(len(self._keys), token=token)
        self._keys.append(token)

    def _logits(self) -> torch.Tensor:
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self._ctx(), -1)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())

    def generate(self, embeds: torch.Tensor, keys: list, max_new_tokens: int, eos_ids: set[int],
                 pick: Callable[[torch.Tensor], int], should_stop: Callable[[], bool] = lambda: False,
                 ) -> Iterator[int]:
        """Yield new tokens for a prompt given as (positions, hidden) input embeddings; `keys`
        names each position for KV reuse; `pick` turns logits into the next token."""
        if embeds.shape[-1] != self.n_embd:
            raise ConfigError(f"embeddings of width {embeds.shape[-1]} for an LLM of width {self.n_embd}")
        with self._lock:
            self._prefill(embeds.detach().float().cpu().numpy(), keys)
            for _ in range(max_new_tokens):
                token = pick(self._logits())
                yield token
                if token in eos_ids or should_stop() or len(self._keys) + 1 >= self.n_ctx:
                    return
                self._step(token)


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
