"""The training precision `auto` resolves to: bf16 only where the hardware runs it natively.

bf16 autocast on a CPU without bf16 instructions is emulated, and slower than fp32: on a Xeon
with AVX512 but no AVX512-BF16 or AMX, a demo align step took 30-47 s in bf16 against 8-15 s in
fp32. On one with AMX, a bf16 matmul ran at 3.0 TFLOPS against fp32's 0.33. So the choice is
made from what the processor says it has.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from llava_lite.cpu_features import native_bf16


def resolve_precision(requested: str, cuda: bool | None = None, flags: set[str] | None = None) -> tuple[str, str]:
    """(precision, why) for a recipe's `precision`; only `auto` is decided here."""
    if requested != "auto":
        return requested, "set by the recipe"
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda:
        if torch.cuda.is_bf16_supported():
            return "bf16", f"auto: {torch.cuda.get_device_name()} supports bf16"
        return "fp16", f"auto: {torch.cuda.get_device_name()} has no bf16; fp16 with loss scaling"
    native = native_bf16(flags)
    if native:
        return "bf16", f"auto: the CPU runs bf16 natively ({', '.join(native)})"
    return "fp32", ("auto: the CPU has no native bf16 (no avx512_bf16, amx_bf16 or bf16 flag), "
                    "where bf16 is emulated and slower than fp32")


@contextmanager
def frozen_linear_weights(model: nn.Module, dtype: torch.dtype):
    """Within the block, the frozen weights of `model`'s linear layers are held in `dtype`.

    Autocast casts a weight at every matmul, and caches the cast only for weights that require
    grad: for a LoRA-tuned LLM that is a full copy of the frozen model per micro-batch (7% of a
    demo adapter step). A linear layer's result is the same either way, since autocast would
    compute it from exactly this cast. Weights shared with an embedding stay as they are, so
    the residual stream keeps its precision. The original tensors are put back on exit.
    """
    shared = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    swapped = []
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Linear) and not w.requires_grad and id(w) not in shared and w.dtype != dtype:
            swapped.append((w, w.data))
            w.data = w.data.to(dtype)
    try:
        yield len(swapped)
    finally:
        for w, data in swapped:
            w.data = data
