"""Building a model from its config, and checkpoint folders.

A checkpoint folder holds `config.json`, `projector.safetensors` and, when LoRA is on, the
peft adapter in `adapter/`. A checkpoint whose LLM weights changed (merged LoRA) also holds
them in `llm/`. Nothing is unpickled: weights are safetensors only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llava_lite.atomic import atomic_dir
from llava_lite.config import ConfigError, LlavaLiteConfig
from llava_lite.domain_gate import GATE_NAME, DomainGate
from llava_lite.llm import llm_hidden_size, load_llm
from llava_lite.lora import add_lora, is_peft, load_adapter_weights, load_lora
from llava_lite.modeling import LlavaLiteModel
from llava_lite.processor import LlavaLiteProcessor
from llava_lite.projectors import build_projector
from llava_lite.registry import VISION_TOWERS

CONFIG_NAME = "config.json"
PROJECTOR_NAME = "projector.safetensors"
ADAPTER_DIR = "adapter"
LLM_DIR = "llm"


def build_model(
    config: LlavaLiteConfig,
    checkpoint_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    trainable_lora: bool = False,
) -> tuple[LlavaLiteModel, LlavaLiteProcessor]:
    """Build the model a config describes; with `checkpoint_dir`, load its trained weights.

    Without a checkpoint the projector is freshly initialised (seeded) and LoRA, if enabled,
    starts from peft's zero-delta initialisation.
    """
    config.validate()
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if config.llava_hf_path:
        from llava_lite.hf_interop import load_llava_hf_parts

        tower, projector, llm, tokenizer = load_llava_hf_parts(config, dtype=dtype)
    else:
        tower = VISION_TOWERS.get(config.vision.name)(config.vision)
        llm_path = str(ckpt / config.llm_subfolder) if (ckpt and config.llm_subfolder) else None
        llm, tokenizer = load_llm(config.llm, path=llm_path, dtype=dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            projector = build_projector(config.projector.name, tower.hidden_size, llm_hidden_size(llm))
    projector.to(dtype)
    if ckpt is not None and (ckpt / PROJECTOR_NAME).is_file():
        load_projector(projector, ckpt)
    if config.lora.enabled:
        if ckpt is not None and (ckpt / ADAPTER_DIR).is_dir():
            llm = load_lora(llm, ckpt / ADAPTER_DIR, trainable=trainable_lora)
        elif ckpt is not None:
            raise ConfigError(f"{ckpt}: config has lora.enabled but the folder has no {ADAPTER_DIR}/")
        else:
            llm = add_lora(llm, config.lora)
    processor = LlavaLiteProcessor(config, tokenizer, tower.num_tokens, tower.preprocess)
    model = LlavaLiteModel(config, tower, projector, llm, processor.image_token_id)
    if config.label_bridge.enabled:
        model.domain_gate = _load_gate(config, tower, ckpt)
    model.eval()
    return model, processor


def load_projector(projector, ckpt: Path) -> None:
    path = ckpt / PROJECTOR_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the checkpoint has no projector weights")
    projector.load_state_dict(load_file(str(path)), strict=True)


def load_weights(model: LlavaLiteModel, ckpt: str | Path) -> None:
    """A checkpoint's trained weights (projector, LoRA adapter) into a live model built from
    the same config: how a training run resumes. `build_model` reads the same files."""
    ckpt = Path(ckpt)
    load_projector(model.projector, ckpt)
    if is_peft(model.llm):
        load_adapter_weights(model.llm, ckpt / ADAPTER_DIR)


def _load_gate(config: LlavaLiteConfig, tower, ckpt: Path | None) -> DomainGate:
    if tower.class_names is None:
        raise ConfigError(f"label_bridge.enabled needs a tower with a classifier head; {config.vision.name!r} has none")
    if ckpt is None or not (ckpt / GATE_NAME).is_file():
        raise ConfigError(f"{ckpt}: config has label_bridge.enabled but the folder has no {GATE_NAME} "
                          "(a training stage with fit_domain_gate writes it)")
    return DomainGate.load(ckpt / GATE_NAME)


def is_checkpoint(path: str | Path) -> bool:
    cfg = Path(path) / CONFIG_NAME
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(data, dict) and "vision" in data and "projector" in data and "llm" in data


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, trainable_lora: bool = False):
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint folder not found")
    config = LlavaLiteConfig.load(path / CONFIG_NAME)
    if not (path / PROJECTOR_NAME).is_file() and not config.llava_hf_path:
        raise FileNotFoundError(f"{path}: no {PROJECTOR_NAME} in checkpoint")
    return build_model(config, checkpoint_dir=path, dtype=dtype, trainable_lora=trainable_lora)


def load_model_folder(path: str | Path, dtype: torch.dtype = torch.float32, trainable_lora: bool = False):
    """(model, processor) from a llava-lite checkpoint or a transformers llava-hf folder."""
    if is_checkpoint(path):
        return load_checkpoint(path, dtype=dtype, trainable_lora=trainable_lora)
    from llava_lite.hf_interop import is_llava_hf, llava_hf_config

    if not is_llava_hf(path):
        raise FileNotFoundError(
            f"{path}: neither a llava-lite checkpoint (config.json with vision/projector/llm) "
            "nor a transformers LlavaForConditionalGeneration folder"
        )
    return build_model(llava_hf_config(str(path)), dtype=dtype)


def is_model_folder(path: str | Path) -> bool:
    """A folder `load_model_folder` can read (a llava-lite checkpoint or a local llava-hf folder)."""
    from llava_lite.hf_interop import is_llava_hf

    return is_checkpoint(path) or (Path(path).is_dir() and is_llava_hf(path))


def save_checkpoint(model: LlavaLiteModel, out_dir: str | Path, save_llm: bool = False, tokenizer=None,
                    weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint folder atomically (a temp folder renamed into place).

    `save_llm` writes the full LLM weights too (needed once LoRA is merged or the LLM itself
    was trained); otherwise the LLM is referenced by `config.llm.model_id`. `weights` gives
    the projector and LoRA tensors by their names in `model.state_dict()`, for a model whose
    own are sharded (train/sharding.py).
    """
    out = Path(out_dir)
    config = model.config
    if config.label_bridge.enabled and model.domain_gate is None:
        raise ValueError("config has label_bridge.enabled but the model has no fitted domain gate")
    with atomic_dir(out) as tmp:
        if weights is None:
            state = model.projector.state_dict()
        else:
            state = {k.removeprefix("projector."): v for k, v in weights.items() if k.startswith("projector.")}
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(state, str(tmp / PROJECTOR_NAME), metadata={"format": "pt"})
        if is_peft(model.llm):
            llm_state = None if weights is None else {
                k.removeprefix("llm."): v for k, v in weights.items() if k.startswith("llm.")}
            model.llm.save_pretrained(str(tmp / ADAPTER_DIR), state_dict=llm_state)
            _sort_target_modules(tmp / ADAPTER_DIR / "adapter_config.json")
        if model.domain_gate is not None:
            model.domain_gate.save(tmp / GATE_NAME)
        if save_llm or config.llm_subfolder:
            if is_peft(model.llm):
                raise ValueError("merge the LoRA adapter (merge_lora) before saving full LLM weights")
            model.llm.save_pretrained(str(tmp / LLM_DIR))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp / LLM_DIR))
            config.llm_subfolder = LLM_DIR
        config.save(tmp / CONFIG_NAME)
    return out


def _sort_target_modules(path: Path) -> None:
    """peft keeps `target_modules` as a set and writes it in hash order, which changes from
    process to process; sorted, the same training writes the same bytes."""
    data = json.loads(path.read_text())
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
        path.write_text(json.dumps(data, indent=2, sort_keys=True))
