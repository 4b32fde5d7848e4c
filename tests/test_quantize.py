"""Quantized inference on a tiny model: the LoRA adapter is merged first, the LLM's linear
layers become int8, its logits stay close to full precision, and the weights shrink."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_inputs

from llava_lite.benchmark import state_bytes
from llava_lite.quantize import resolve_backend


def _int8_module_type(backend: str):
    if backend == "bnb-8bit":
        from bitsandbytes.nn import Linear8bitLt

        return Linear8bitLt
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    return DynamicInt8Linear


@pytest.mark.parametrize("mode, backend", [("8bit", "bnb-8bit"), ("dynamic-int8", "dynamic-int8")])
def test_8bit_on_cpu_merges_lora_then_quantizes(tiny_lite, images, mode, backend):
    lite = tiny_lite(lora=True)
    ids, pixels = prompt_inputs(lite, images[:1], "what is it?")
    with torch.no_grad():
        ref = lite.model(input_ids=ids, pixel_values=pixels).logits
    fp32_bytes = state_bytes(lite.model.llm)
    lite.quantize(mode)
    assert lite.quantization == backend
    assert lite.config.lora.enabled is False  # merged: nothing left to merge afterwards
    with pytest.raises(ValueError, match="no LoRA adapter"):
        lite.merge_lora()
    assert any(isinstance(m, _int8_module_type(backend)) for m in lite.model.llm.modules())
    with torch.no_grad():
        out = lite.model(input_ids=ids, pixel_values=pixels).logits
    # int8 weights (and, for dynamic-int8, activations): close to fp32, not equal
    assert not torch.equal(out, ref)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.2
    assert state_bytes(lite.model.llm) < fp32_bytes


def test_backend_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("8bit", cpu) == "bnb-8bit"
    assert resolve_backend("8bit", cuda) == "bnb-8bit"
    assert resolve_backend("4bit", cpu) == "bnb-4bit"
    assert resolve_backend("torchao-int8", cpu) == "torchao-int8"
    with pytest.raises(ValueError, match="quantize='3bit'"):
        resolve_backend("3bit", cpu)


def test_state_bytes_counts_tied_weights_once():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    assert state_bytes(model) == 10 * 4 * 4
