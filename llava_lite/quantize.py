"""Quantized inference for the LLM (the tower and projector stay in full precision).

Modes a user asks for, resolved to a backend:
- "8bit": on a CPU, int8 weights with per-channel scales (`llava_lite.weight_int8`). Decoding
  (under 32 rows a step) keeps full-precision activations (torch's fused weight-only kernel).
  Prefills, and steps of 32 rows or more, quantize each activation row to int8 for an int8
  matmul ("int8-w8a8-prefill") where the CPU has AVX512-VNNI (torch's int8 matmul is a scalar
  loop without it), and cast the weights for a bf16/fp32 matmul elsewhere
  ("int8-weight-only"). On CUDA, bitsandbytes LLM.int8. bitsandbytes' CPU path decoded at
  about half of fp32's speed on a 2-core machine. torch's dynamic int8 is fast but quantizes
  activations per tensor, and SmolLM2's outlier activations cost it 30-45 points of accuracy
  (38-54% vs 83%); one scale per row keeps an outlier's damage to its own row.
- "4bit": bitsandbytes NF4.
Backends can also be named directly: "int8-w8a8-prefill", "int8-weight-only", "bnb-8bit", "bnb-4bit",
"dynamic-int8", "torchao-int8", "torchao-int8-weight-only" (torchao must be installed).
A LoRA adapter is merged first, so the quantized weights include it.
"""

from __future__ import annotations

import logging
import tempfile

import torch
from torch import nn

from llava_lite import weight_int8
from llava_lite.cpu_features import native_int8
from llava_lite.lora import is_peft

# Activations above this magnitude stay in full precision (LLM.int8's outlier split). The
# demo model on all easy-VQA test questions: 6.0 (bitsandbytes' default) lost 1.00 point
# against fp32, 5.0 lost 0.08 and still decoded faster than fp32; 3.0 decoded slower.
LLM_INT8_THRESHOLD = 5.0

# the CPU int8 backends -> how their prefills multiply (`weight_int8.Int8Linear.prefill_kernel`)
INT8_PREFILL_KERNELS = {"int8-w8a8-prefill": "int8", "int8-weight-only": "dequant"}
BACKENDS = (*INT8_PREFILL_KERNELS, "bnb-8bit", "bnb-4bit", "dynamic-int8", "torchao-int8", "torchao-int8-weight-only")


def resolve_backend(mode: str, device: torch.device) -> str:
    if mode in BACKENDS:
        return mode
    if mode == "8bit":
        if device.type == "cuda":
            return "bnb-8bit"
        return "int8-w8a8-prefill" if _int8_matmul_native() else "int8-weight-only"  # torch>=2.4 has the kernel
    if mode == "4bit":
        return "bnb-4bit"
    raise ValueError(f"quantize={mode!r}; use none, 8bit, 4bit or one of {BACKENDS}")


def _int8_matmul_native() -> bool:
    return bool(native_int8()) and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def quantize_model(lite, mode: str) -> str:
    """Quantize `lite.model.llm` in place; returns the backend used."""
    model = lite.model
    backend = resolve_backend(mode, model.device)
    if is_peft(model.llm):
        lite.merge_lora()  # also marks the config as merged
    if backend in INT8_PREFILL_KERNELS:
        model.llm = _int8(model.llm, backend)
    elif backend == "dynamic-int8":
        model.llm = _dynamic_int8(model.llm)
    elif backend.startswith("torchao-"):
        model.llm = _torchao(model.llm, backend)
    else:
        model.llm = _bitsandbytes(model.llm, backend, model.device)
    return backend


def _int8(llm: nn.Module, backend: str) -> nn.Module:
    if llm.device.type != "cpu":
        raise ValueError(f"quantize={backend!r} runs on the CPU; on CUDA use 'bnb-8bit'")
    if backend == "int8-w8a8-prefill" and not _int8_matmul_native():
        logging.getLogger(__name__).warning(
            "quantize='int8-w8a8-prefill': this CPU (or torch build) has no AVX512-VNNI int8 matmul, so "
            "prefills run torch's scalar int8 loop; 'int8-weight-only' is faster here")
    llm.float()  # norms, attention and the residual stream stay fp32
    settings = weight_int8.prefill_settings(INT8_PREFILL_KERNELS[backend])
    weight_int8.quantize_linears(llm.get_decoder(), **settings)
    # The tied LM head is a fifth of SmolLM2-135M's weights and read on every token.
    weight_int8.quantize_tied_embeddings(llm, **settings)
    return llm


def _dynamic_int8(llm: nn.Module) -> nn.Module:
    import warnings

    from torch.ao.quantization import quantize_dynamic

    llm.float()
    # The LM head is tied to the embeddings in small models; quantizing only the transformer
    # blocks keeps the tie and the logits' precision.
    head = llm.get_output_embeddings()
    decoder = llm.get_decoder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(decoder, {nn.Linear}, dtype=torch.qint8, inplace=True)
    assert llm.get_output_embeddings() is head
    return llm


def _torchao(llm: nn.Module, backend: str) -> nn.Module:
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as err:
        raise ImportError(f"quantize={backend!r} needs torchao: pip install torchao") from err
    llm.float()
    config = Int8DynamicActivationInt8WeightConfig() if backend == "torchao-int8" else Int8WeightOnlyConfig()
    # As with dynamic-int8: the transformer blocks only, so the tied LM head stays exact.
    quantize_(llm.get_decoder(), config)
    return llm


def _bitsandbytes(llm: nn.Module, backend: str, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if backend == "bnb-8bit":
        qcfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=LLM_INT8_THRESHOLD)
    else:
        qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    # bitsandbytes quantizes while loading, so round-trip the (merged) weights via a folder.
    with tempfile.TemporaryDirectory(prefix="llava-lite-quant-") as tmp:
        llm.save_pretrained(tmp)
        target = "auto" if device.type == "cuda" else "cpu"
        return AutoModelForCausalLM.from_pretrained(tmp, quantization_config=qcfg, device_map=target)
