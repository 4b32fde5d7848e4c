"""Loading the causal language model and its tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from llava_lite.config import ConfigError, LLMConfig
from llava_lite.packaged import PACKAGED_LLMS


def resolve_llm_path(model_id: str) -> str:
    """A packaged name (exact match) resolves to its converted folder; anything else is a
    Hub id or local folder passed to transformers unchanged."""
    if model_id in PACKAGED_LLMS:
        return str(PACKAGED_LLMS[model_id]())
    return model_id


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if getattr(tok, "chat_template", None) is None:
        # llava-hf folders keep the chat template with the processor, not the tokenizer.
        for name in ("chat_template.jinja", "chat_template.json"):
            candidate = Path(path) / name
            if candidate.is_file():
                text = candidate.read_text()
                if name.endswith(".json"):
                    import json

                    text = json.loads(text)["chat_template"]
                tok.chat_template = text
                break
    return tok


def load_llm(config: LLMConfig, path: str | None = None, dtype: torch.dtype = torch.float32, **kwargs):
    """Return (causal LM, tokenizer). `path` overrides config.model_id (e.g. merged weights)."""
    from transformers import AutoModelForCausalLM

    source = path or resolve_llm_path(config.model_id)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=config.trust_remote_code, **kwargs
        )
    except OSError as err:
        raise ConfigError(f"llm.model_id={config.model_id!r}: cannot load a causal LM from {source!r} ({err})") from err
    # A checkpoint's own LLM folder may lack tokenizer files; the base model's then apply.
    tok_source = source
    if path is not None and not any((Path(path) / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        tok_source = resolve_llm_path(config.model_id)
    tokenizer = load_tokenizer(tok_source, config.trust_remote_code)
    return model, tokenizer


def llm_hidden_size(llm) -> int:
    return llm.get_input_embeddings().embedding_dim


def _cache_name() -> str:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# transformers 5.x names the KV cache `cache` and warns on each call given `past_key_values`;
# 4.x knows only `past_key_values`.
CACHE_ARG = _cache_name()


def with_cache(cache) -> dict:
    """The keyword argument that passes `cache` to this transformers version's forward/generate."""
    return {CACHE_ARG: cache}


def output_cache(out):
    """The KV cache a forward pass returned."""
    return getattr(out, CACHE_ARG, None)
