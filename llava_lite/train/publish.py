"""Publishing a trained run's final model as a compact checkpoint (weights stored in fp16)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llava_lite.atomic import atomic_dir
from llava_lite.checkpoint import ADAPTER_DIR, CONFIG_NAME, PROJECTOR_NAME, is_checkpoint
from llava_lite.domain_gate import GATE_NAME


def _half(src: Path, dst: Path) -> None:
    tensors = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in load_file(str(src)).items()}
    save_file(tensors, str(dst), metadata={"format": "pt"})


def publish(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Copy config, projector and LoRA adapter, casting weights to fp16 (they load back into
    fp32 modules). The result is written to a temp folder and renamed into place."""
    src, out = Path(model_dir), Path(out_dir)
    if not is_checkpoint(src):
        raise FileNotFoundError(f"{src}: not a llava-lite checkpoint folder")
    if (src / "llm").exists():
        raise ValueError(f"{src}: holds full LLM weights; publish only projector + adapter checkpoints")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; a published model is read by everyone
        shutil.copyfile(src / CONFIG_NAME, tmp / CONFIG_NAME)
        _half(src / PROJECTOR_NAME, tmp / PROJECTOR_NAME)
        if (src / GATE_NAME).is_file():  # small, and its threshold is exact in fp32
            shutil.copyfile(src / GATE_NAME, tmp / GATE_NAME)
        if (src / ADAPTER_DIR).is_dir():
            (tmp / ADAPTER_DIR).mkdir()
            for f in (src / ADAPTER_DIR).iterdir():
                if f.name == "adapter_model.safetensors":
                    _half(f, tmp / ADAPTER_DIR / f.name)
                elif f.suffix in (".json", ".md"):
                    shutil.copyfile(f, tmp / ADAPTER_DIR / f.name)
    return out
