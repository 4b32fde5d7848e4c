"""Quantized inference on a tiny model: the LoRA adapter is merged first, the LLM's linear
layers become int8, its logits stay close to full precision, and the weights shrink."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_inputs

from llava_lite import quantize
from llava_lite.benchmark import state_bytes
from llava_lite.quantize import INT8_PREFILL_KERNELS, resolve_backend
from llava_lite.weight_int8 import (
    Int8Embedding,
    Int8Linear,
    int8_rows_matmul,
    quantize_linears,
    quantize_tied_embeddings,
)


def _int8_module_type(backend: str):
    if backend in INT8_PREFILL_KERNELS:
        return Int8Linear
    if backend == "bnb-8bit":
        from bitsandbytes.nn import Linear8bitLt

        return Linear8bitLt
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    return DynamicInt8Linear


@pytest.mark.parametrize("mode, backend", [("8bit", resolve_backend("8bit", torch.device("cpu"))),
                                           ("int8-w8a8-prefill", "int8-w8a8-prefill"),
                                           ("int8-weight-only", "int8-weight-only"), ("bnb-8bit", "bnb-8bit"),
                                           ("dynamic-int8", "dynamic-int8")])
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
    if backend in INT8_PREFILL_KERNELS:
        kernels = {m.prefill_kernel for m in lite.model.llm.modules() if isinstance(m, Int8Linear)}
        assert kernels == {INT8_PREFILL_KERNELS[backend]}
    with torch.no_grad():
        out = lite.model(input_ids=ids, pixel_values=pixels).logits
    # int8 weights (and, for dynamic-int8, activations): close to fp32, not equal
    assert not torch.equal(out, ref)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.2
    assert state_bytes(lite.model.llm) < fp32_bytes


def test_backend_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(quantize, "native_int8", lambda: ["avx512_vnni"])
    assert resolve_backend("8bit", cpu) == "int8-w8a8-prefill"
    monkeypatch.setattr(quantize, "native_int8", lambda: [])  # e.g. AVX-VNNI without AVX512
    assert resolve_backend("8bit", cpu) == "int8-weight-only"  # no int8 dot products: bf16/fp32 prefills
    assert resolve_backend("int8-w8a8-prefill", cpu) == "int8-w8a8-prefill"  # asked for by name: kept
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


def test_weight_only_int8_linear_is_the_dequantized_matmul():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    linear.weight.data[3, 5] = 4.0  # an outlier weight sets its row's scale, not the others'
    q = Int8Linear(linear, compute_dtype=torch.float32)
    assert q.weight_int8.dtype == torch.int8 and q.scale.shape == (48,)
    x = torch.randn(2, 7, 64) * torch.linspace(0.1, 30, 64)  # outlier-sized activations stay exact
    expected = x @ q.dequantized_weight().T + linear.bias
    out = q(x)
    assert out.shape == (2, 7, 48)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-3)
    ref = linear(x).detach()
    rows = [i for i in range(48) if i != 3]
    rel = ((out - ref)[..., rows].norm() / ref[..., rows].norm()).item()
    assert 0 < rel < 0.01  # int8 per channel: close, not equal; the outlier row is coarser alone
    # each row's error is bounded by half a quantization step of that row
    err = (q.dequantized_weight() - linear.weight.detach()).abs().amax(dim=1)
    assert torch.all(err <= q.scale / 2 + 1e-7)


def test_weight_only_int8_keeps_bf16_activations_and_skips_subclasses():
    linear = torch.nn.Linear(32, 16, bias=False)
    q = Int8Linear(linear, compute_dtype=torch.bfloat16)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    assert q(x).dtype == torch.bfloat16
    assert q(x.float()).dtype == torch.float32  # computed in bf16, returned in the input's dtype

    class Custom(torch.nn.Linear):
        pass

    tree = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 4), Custom(4, 4)))
    assert quantize_linears(tree) == 2
    assert isinstance(tree[1][1], Custom)  # a subclass may do more than a matmul: left alone


def test_tied_head_and_embeddings_share_one_int8_table(tiny_lite):
    llm = tiny_lite().model.llm
    assert llm.get_output_embeddings().weight is llm.get_input_embeddings().weight
    table = llm.get_input_embeddings().weight.detach().clone()
    ids = torch.tensor([[1, 5, 9, 200]])
    hidden = torch.randn(1, 4, table.shape[1])
    assert quantize_tied_embeddings(llm)
    head, embed = llm.get_output_embeddings(), llm.get_input_embeddings()
    assert isinstance(head, Int8Linear) and isinstance(embed, Int8Embedding)
    assert embed(ids).dtype == torch.float32
    torch.testing.assert_close(embed(ids), table[ids], atol=(head.scale.float().max() / 2).item(), rtol=0)
    logits = head(hidden)
    rel = ((logits - hidden @ table.T).norm() / (hidden @ table.T).norm()).item()
    assert rel < 0.02
    assert sum(b.numel() for b in llm.buffers() if b.dtype == torch.int8) == table.numel()  # one table
    assert not quantize_tied_embeddings(llm)  # already done: not tied nn.Linear/nn.Embedding any more


@pytest.mark.parametrize("dequant_dtype", [torch.bfloat16, torch.float32])
def test_weight_only_int8_prefill_path_matches_the_kernel(dequant_dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    kernel = Int8Linear(linear)
    dequant = Int8Linear(linear, prefill_from_rows=8, dequant_dtype=dequant_dtype)
    few, many = torch.randn(1, 3, 96), torch.randn(2, 20, 96)
    torch.testing.assert_close(dequant(few), kernel(few))  # under the threshold: the same kernel
    out, ref = dequant(many), kernel(many)
    assert out.shape == ref.shape == (2, 20, 40)
    assert ((out - ref).norm() / ref.norm()).item() < 0.01  # both bf16 with fp32 sums: not bit-equal
    # the casts share one buffer per thread: another layer in between must not leave stale weights
    other_linear = torch.nn.Linear(96, 40)
    other = Int8Linear(other_linear, prefill_from_rows=8, dequant_dtype=dequant_dtype)
    other_out = other(many)
    assert ((other_out - Int8Linear(other_linear)(many)).norm() / other_out.norm()).item() < 0.01
    torch.testing.assert_close(dequant(many), out)


def test_int8_rows_matmul_scales_each_row_on_its_own():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=False)
    q = Int8Linear(linear, compute_dtype=torch.float32)
    x = torch.randn(20, 96)  # 20 rows: padded to the row bucket inside, cut back after
    x[3, 7] = 300.0  # one outlier activation, as SmolLM2's reach ~100x the median
    out = int8_rows_matmul(x, q.weight_int8, q.scale)
    assert out.shape == (20, 40) and out.dtype == torch.float32
    # the exact integer product of the quantized rows, rescaled
    row_scale = x.abs().amax(dim=1, keepdim=True) / 127
    xq = torch.round(x / row_scale)
    expected = (xq.double() @ q.weight_int8.double().T) * row_scale.double() * q.scale.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    # against the full-precision activations: only the outlier's own row loses precision
    ref = x @ q.dequantized_weight().T
    rel = (out - ref).norm(dim=1) / ref.norm(dim=1)
    others = torch.cat([rel[:3], rel[4:]])
    assert others.max() < 0.02 < rel[3]


def test_int8_prefill_kernel_matches_the_decode_kernel():  # the dequant one: the test above
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    kernel = Int8Linear(linear)
    prefill = Int8Linear(linear, prefill_from_rows=8, prefill_kernel="int8")
    few, many = torch.randn(1, 3, 96), torch.randn(2, 20, 96)
    torch.testing.assert_close(prefill(few), kernel(few))  # under the threshold: the decode kernel
    out, ref = prefill(many), kernel(many)
    assert out.shape == ref.shape == (2, 20, 40)
    assert 0 < ((out - ref).norm() / ref.norm()).item() < 0.02
    with pytest.raises(ValueError, match="prefill_kernel='int4'"):
        Int8Linear(linear, prefill_kernel="int4")


def test_layers_reading_one_tensor_quantize_its_rows_once(monkeypatch):
    from llava_lite import weight_int8

    calls = []
    real = weight_int8.quantize_rows
    monkeypatch.setattr(weight_int8, "quantize_rows", lambda x: calls.append(1) or real(x))
    torch.manual_seed(0)
    q_proj, k_proj = (Int8Linear(torch.nn.Linear(96, 40, bias=False), prefill_from_rows=8, prefill_kernel="int8")
                      for _ in range(2))
    x = torch.randn(2, 20, 96)
    q_proj(x)
    k_out = k_proj(x)
    assert len(calls) == 1  # as q/k/v read one tensor
    alone = int8_rows_matmul(x.reshape(-1, 96), k_proj.weight_int8, k_proj.scale).reshape(2, 20, 40)
    torch.testing.assert_close(k_out, alone)
    calls.clear()
    x.mul_(2)  # changed in place: quantized afresh (the rows are the same, their scales double)
    torch.testing.assert_close(k_proj(x), 2 * k_out)
    assert len(calls) == 1
    k_proj(x.clone())  # equal values, another tensor: not trusted to be the same
    assert len(calls) == 2
