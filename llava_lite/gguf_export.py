"""`llava-lite export-gguf`: a llama.cpp LLM GGUF plus, for CLIP-tower models, an mmproj GGUF.

llama.cpp (llama-mtmd-cli, llama-server, llama-cpp-python's MTMDChatHandler) loads the pair as
written: `-m <out>/llm-<type>.gguf --mmproj <out>/mmproj-<type>.gguf`.
"""

from __future__ import annotations

from pathlib import Path

from llava_lite.config import ConfigError
from llava_lite.gguf_llm import check_llm, outtype, write_llm_gguf
from llava_lite.gguf_mmproj import mmproj_refusal, write_mmproj_gguf
from llava_lite.hf_interop import export_chat_template
from llava_lite.lora import merged_copy

# libmtmd's default media marker (mtmd_default_marker()): where the image's embeddings go
MEDIA_MARKER = "<__media__>"


def gguf_chat_template(processor, config) -> str:
    """The chat template llama.cpp gets: llava-lite's rendering, images at libmtmd's marker."""
    return export_chat_template(processor.tokenizer.chat_template, config, image_text=MEDIA_MARKER)


def export_gguf(model, processor, out_dir: str | Path, type_name: str = "f16",
                llm_only: bool = False) -> dict[str, Path]:
    """Write `model` for llama.cpp; returns {"llm": path, "mmproj": path} (no mmproj if `llm_only`).

    Everything is checked before anything is written: a model whose vision side has no mmproj
    form fails with the reason unless `llm_only` is set.
    """
    out = outtype(type_name)
    llm = model.llm
    check_llm(llm.get_base_model() if hasattr(llm, "get_base_model") else llm)
    why = mmproj_refusal(model)
    if why is not None and not llm_only:
        raise ConfigError(f"export-gguf: {why}. Pass --llm-only to write the language model alone")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    template = gguf_chat_template(processor, model.config)
    merged = merged_copy(llm)
    paths = {"llm": write_llm_gguf(merged, processor.tokenizer, template, folder / f"llm-{out.name}.gguf", out)}
    if not llm_only:
        text_dim = merged.get_input_embeddings().embedding_dim
        paths["mmproj"] = write_mmproj_gguf(model, folder / f"mmproj-{out.name}.gguf", out, text_dim)
    return paths
