"""The training precision `auto` resolves to: bf16 only where the hardware runs it natively.

bf16 autocast on a CPU without bf16 instructions is emulated, and slower than fp32: on a Xeon
with AVX512 but no AVX512-BF16 or AMX, a demo align step took 30-47 s in bf16 against 8-15 s in
fp32. On one with AMX, a bf16 matmul ran at 3.0 TFLOPS against fp32's 0.33. So the choice is
made from what the processor says it has.
"""

from __future__ import annotations

import torch

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
