"""Training with the LLM's decoder layers compiled by torch.compile (`compile_layers=true`).

On a CPU the frozen linear layers already run near the matmul peak, and much of the rest of a
step is small element-wise work between them: RMSNorm, rotary embeddings, SwiGLU, the LoRA
scaling and the casts that autocast inserts, each a separate pass over the activations.
Inductor fuses those into a few loops per layer, forward and backward. Each layer is compiled
on its own (regional compilation, with dynamic shapes so that packs of every length share one
graph); the layers have the same code, so the compile is paid once per stage: 15-50 s on the
demo recipe on 2 CPU cores. Packed-row attention (`prefix_attention.packed_attention`) stays
eager: its index tensors come from data-dependent shapes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from llava_lite.config import ConfigError


def decoder_layers(llm: nn.Module) -> list[nn.Module]:
    """The LLM's repeated blocks: the modules whose class the model names in `_no_split_modules`
    (read as `loop.TrainModule` reads it for FSDP's shard units; peft forwards the attribute)."""
    names = set(getattr(llm, "_no_split_modules", None) or [])
    return [m for m in llm.modules() if type(m).__name__ in names]


def check_compiler(device: torch.device) -> None:
    """Inductor builds C++ kernels on a CPU; without a compiler the first step would fail deep
    inside torch, so say it up front."""
    if device.type != "cpu":
        return
    candidates = [os.environ.get("CXX"), "c++", "g++", "clang++"]
    if not any(c and shutil.which(c) for c in candidates):
        raise ConfigError("compile_layers=true needs a C++ compiler on a CPU (torch inductor builds its "
                          "kernels with it): install g++, or set compile_layers=false")


@contextmanager
def compiled_layers(llm: nn.Module, device: torch.device) -> Iterator[int]:
    """Within the block, each decoder layer of `llm` runs its compiled forward; yields the count.
    The layers' own forwards are put back on exit, so generation after training is eager."""
    layers = decoder_layers(llm)
    if not layers:
        raise ConfigError(f"compile_layers=true: {type(llm).__name__} names no decoder layer class in "
                          "_no_split_modules; set compile_layers=false")
    check_compiler(device)
    for layer in layers:
        layer.forward = torch.compile(layer.forward, dynamic=True)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward  # the instance attribute; the class's forward shows through again
