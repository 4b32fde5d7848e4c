"""LoRA on the LLM through peft (never on the tower; the projector trains as a plain module)."""

from __future__ import annotations

from pathlib import Path

from llava_lite.config import LoraConfig


def add_lora(llm, config: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(llm, peft_config)


def merged_copy(llm):
    """A copy of `llm` with any LoRA adapter folded into its weights (the original is kept)."""
    import copy

    llm = copy.deepcopy(llm)
    return llm.merge_and_unload() if is_peft(llm) else llm


def load_lora(llm, adapter_dir: Path, trainable: bool = False):
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (the checkpoint's LoRA adapter is missing)")
    return PeftModel.from_pretrained(llm, str(adapter_dir), is_trainable=trainable)


def is_peft(llm) -> bool:
    from peft import PeftModel

    return isinstance(llm, PeftModel)


def load_adapter_weights(llm, adapter_dir: Path) -> None:
    """A saved adapter's weights into the live LoRA adapter of `llm` (resuming training)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: the checkpoint has no LoRA weights")
    result = set_peft_model_state_dict(llm, load_file(str(weights)))
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"{weights}: unexpected LoRA keys {result.unexpected_keys[:3]}")
