"""Int8 linear layers for CPU inference.

Each output channel's weights are stored as int8 with one full-precision scale. Decoding (a
few rows) keeps the activations in full precision and runs torch's own fused CPU kernel
(`aten._weight_int8pack_mm`, the one gpt-fast and torchao's weight-only config use), which
reads a quarter of fp32's bytes per token: decoding a small LLM on a CPU is bound by those
bytes. A prefill (many rows) is bound by arithmetic instead, and is done one of two ways:
- "dequant": the weights are cast to bf16 (or fp32) for one ordinary matmul;
- "int8": each row of activations is quantized to int8 with its own scale and multiplied
  with the int8 weights directly (`torch._int_mm`, oneDNN's VNNI kernels). Per-row scales
  keep SmolLM2's outlier activations (~100x the median) to their own rows; torch's dynamic
  int8, with one scale per tensor, lost 30-45 easy-VQA points.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import nn

from llava_lite.cpu_features import native_bf16


class Int8Linear(nn.Module):
    """`nn.Linear` with per-output-channel symmetric int8 weights (scale = max|w| / 127).

    The kernel's bf16 path is vectorized and its fp32 path is not (10x slower at one token on
    a 2-core Xeon), so inputs are computed in `compute_dtype` (bf16 by default) and the output
    is returned in the input's dtype. The kernel is built for a few rows (decoding); from
    `prefill_from_rows` rows on (a prefill), `prefill_kernel` takes over:
    - "dequant" casts the weights to `dequant_dtype` (default `compute_dtype`) for one ordinary
      matmul: in bf16 on a CPU with AMX that was 2.5x faster at 100 rows, in fp32 on an
      AVX2-only CPU 1.1-1.4x at 96 rows;
    - "int8" quantizes each row of activations (`int8_rows_matmul`): on a 2-core AVX512-VNNI
      EPYC, 1.2-2.2x faster than the bf16 cast-and-matmul at 64 rows, per layer shape.
    """

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16,
                 prefill_from_rows: int | None = None, dequant_dtype: torch.dtype | None = None,
                 prefill_kernel: str = "dequant") -> None:
        super().__init__()
        if prefill_kernel not in PREFILL_KERNELS:
            raise ValueError(f"prefill_kernel={prefill_kernel!r}; use one of {PREFILL_KERNELS}")
        self.prefill_from_rows = prefill_from_rows
        self.dequant_dtype = dequant_dtype or compute_dtype
        self.prefill_kernel = prefill_kernel
        weight = linear.weight.detach().to(torch.float32)
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", torch.round(weight / scale[:, None]).clamp(-127, 127)
                             .to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(compute_dtype))
        bias = linear.bias.detach().to(compute_dtype) if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.prefill_from_rows is not None and flat.shape[0] >= self.prefill_from_rows:
            out = self._prefill(x, flat)
        else:
            flat = flat.to(self.scale.dtype).contiguous()
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _prefill(self, x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        if self.prefill_kernel == "int8":
            return int8_rows_matmul(flat, self.weight_int8, self.scale, _shared_rows(x, flat))
        flat = flat.to(self.dequant_dtype)
        weight = _dequant_scratch(self.weight_int8, flat.dtype)
        # oneDNN's bf16 matmul caches per shape (see _bucketed); fp32 goes to BLAS
        if flat.dtype == torch.bfloat16:
            return _bucketed(lambda rows: rows @ weight.T, flat) * self.scale
        return (flat @ weight.T) * self.scale

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.to(self.scale.dtype) * self.scale[:, None]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"prefill_kernel={self.prefill_kernel}")


PREFILL_KERNELS = ("dequant", "int8")
ROW_BUCKET = 64


def int8_rows_matmul(x: torch.Tensor, weight_int8: torch.Tensor, scale: torch.Tensor,
                     rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """`x @ (weight_int8 * scale[:, None]).T` in fp32, with each row of `x` quantized to int8
    (`quantize_rows`, or `rows` if given) and the product summed exactly in int32."""
    quantized, row_scale = rows if rows is not None else quantize_rows(x)
    summed = _bucketed(lambda q: torch._int_mm(q, weight_int8.T), quantized)
    # int32 * fp32 promotes to fp32: one pass instead of a cast and a multiply
    return torch.mul(summed, row_scale).mul_(scale)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of `x` as symmetric int8 with its own fp32 scale (max|row| / 127)."""
    x = x.float()
    row_scale = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127.0)
    return x.div(row_scale).round_().to(torch.int8), row_scale


# q/k/v, and gate/up, read one tensor: its rows are quantized once, then reused (per thread)
_last_rows = threading.local()


def _shared_rows(x: torch.Tensor, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows(flat)`, reused while the same tensor `x`, unchanged, feeds the next layer.
    A weak reference: once `x` is gone it matches nothing, and its memory is not held."""
    if x.is_inference():  # no version counter: an in-place change could not be seen
        return quantize_rows(flat)
    last = getattr(_last_rows, "value", None)
    if last is not None and last[0]() is x and last[1] == x._version:
        return last[2]
    rows = quantize_rows(flat)
    _last_rows.value = (weakref.ref(x), x._version, rows)
    return rows


def _bucketed(matmul, x: torch.Tensor) -> torch.Tensor:
    """`matmul(x)` with x's rows padded to a multiple of ROW_BUCKET. oneDNN (torch's bf16 and
    int8 CPU matmuls) caches a primitive, with buffers, per shape; prompts of every length made
    a server's memory climb ~10-17 MB/min, a few shapes keep that cache small."""
    rows = x.shape[0]
    padded = -(-rows // ROW_BUCKET) * ROW_BUCKET
    if padded != rows:
        x = torch.cat([x, x.new_zeros(padded - rows, x.shape[1])])
    return matmul(x)[:rows]


# Each thread casts weights into one reused buffer: a fresh ~1 MB tensor per layer per prefill
# left a long-running server's heap growing ~10 MB/min (8-client soak) through fragmentation.
SCRATCH_MAX_ELEMENTS = 4 << 20
_scratch = threading.local()


def _dequant_scratch(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` cast to `dtype`, in this thread's scratch buffer where it fits (valid until the
    thread's next call)."""
    if weight.numel() > SCRATCH_MAX_ELEMENTS:
        return weight.to(dtype)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.dtype != dtype:
        buf = _scratch.buf = torch.empty(SCRATCH_MAX_ELEMENTS, dtype=dtype)
    return buf[: weight.numel()].view(weight.shape).copy_(weight)


class Int8Embedding(nn.Module):
    """An embedding that reads the rows of an `Int8Linear` LM head: in a model whose
    input embeddings and LM head are tied, one int8 table (and one scale per token) serves both."""

    def __init__(self, head: Int8Linear, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.head = [head]  # a list, so the table is not registered (and counted) twice
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        return head.weight_int8[ids].to(self.dtype) * head.scale[ids].to(self.dtype).unsqueeze(-1)


def prefill_settings(prefill_kernel: str = "dequant") -> dict:
    """Where the fused kernel hands over to a prefill kernel, and in which dtype, for this CPU.
    - "int8": from 32 rows, the bf16 threshold below (its own crossover is not measured).
    - "dequant": from 32 rows in bf16 where the CPU runs bf16 natively (the two crossed between
      16 and 32 rows on a Xeon with AMX); from 80 rows in fp32 elsewhere, where bf16 matmuls are
      emulated (on a 2-core AVX2 EPYC the kernel costs ~35 us a row per 576x1536 layer, the
      fp32 cast ~0.7 ms once plus ~15 us a row: they cross near 70 rows)."""
    if prefill_kernel == "int8":
        return {"prefill_from_rows": 32, "prefill_kernel": "int8"}
    if native_bf16():
        return {"prefill_from_rows": 32, "dequant_dtype": torch.bfloat16}
    return {"prefill_from_rows": 80, "dequant_dtype": torch.float32}


def quantize_tied_embeddings(llm: nn.Module, compute_dtype: torch.dtype = torch.bfloat16,
                             prefill_from_rows: int | None = None, dequant_dtype: torch.dtype | None = None,
                             prefill_kernel: str = "dequant") -> bool:
    """Quantize a causal LM's tied LM head and input embeddings into one int8 table; returns
    False (and changes nothing) when they are not tied."""
    head, embed = llm.get_output_embeddings(), llm.get_input_embeddings()
    if type(head) is not nn.Linear or type(embed) is not nn.Embedding or head.weight is not embed.weight:
        return False
    qhead = Int8Linear(head, compute_dtype, prefill_from_rows, dequant_dtype, prefill_kernel)
    dtype = embed.weight.dtype
    llm.config.tie_word_embeddings = False  # nothing may re-tie a full-precision table later
    llm.set_output_embeddings(qhead)
    llm.set_input_embeddings(Int8Embedding(qhead, dtype))
    return True


def quantize_linears(module: nn.Module, compute_dtype: torch.dtype = torch.bfloat16,
                     prefill_from_rows: int | None = None, dequant_dtype: torch.dtype | None = None,
                     prefill_kernel: str = "dequant") -> int:
    """Replace every `nn.Linear` under `module` with `Int8Linear`; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, Int8Linear(child, compute_dtype, prefill_from_rows, dequant_dtype, prefill_kernel))
            count += 1
        else:
            count += quantize_linears(child, compute_dtype, prefill_from_rows, dequant_dtype, prefill_kernel)
    return count
