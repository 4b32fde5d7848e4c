"""`llava-lite bench` on a tiny CLIP checkpoint: every figure is measured (positive, finite),
the reference is transformers' LlavaForConditionalGeneration on the exported folder, and the
report shows the bandwidth-bound fraction."""

from __future__ import annotations

import math

import pytest
import torch

from llava_lite.bench_report import markdown
from llava_lite.benchmark import memory_bandwidth_gbs, run_variant
from llava_lite.quantize import resolve_backend


def test_bench_variant_on_a_tiny_clip_model(tiny_lite, tmp_path):
    ckpt = tiny_lite(lora=True).save_pretrained(tmp_path / "ckpt")
    res = run_variant(str(ckpt), "fp32", new_tokens=4, repeats=1, batch_sizes=[1, 2], device=None)
    assert res.reference.startswith("LlavaForConditionalGeneration")
    for name in ("llm_weight_bytes", "image_encode_ms", "prefill_ms", "cold_first_token_ms", "first_token_ms",
                 "second_turn_first_token_ms",
                 "decode_tok_s", "ask_decode_tok_s", "reference_decode_tok_s", "peak_memory_bytes"):
        value = getattr(res, name)
        assert value > 0 and math.isfinite(value), name
    assert set(res.batch_tok_s) == {"1", "2"}
    quant = run_variant(str(ckpt), "8bit", new_tokens=4, repeats=1, batch_sizes=[1], device=None)
    assert quant.backend == resolve_backend("8bit", torch.device("cpu"))
    assert quant.reference.startswith("AutoModelForCausalLM")
    report = {"bandwidth_gbs": memory_bandwidth_gbs(size_mb=64, repeats=2), "threads": 2, "new_tokens": 4,
              "results": [res.__dict__, quant.__dict__, {"variant": "4bit", "error": "boom"}]}
    table = markdown(report)
    assert "| fp32 | fp32 |" in table and "of bound" in table and "failed: boom" in table


@pytest.mark.slow  # needs llama-cpp-python (make llamacpp)
def test_bench_llamacpp_variant_times_llama_cpp_itself(tiny_lite, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_LITE_CACHE", str(tmp_path / "cache"))
    ckpt = tiny_lite(lora=True).save_pretrained(tmp_path / "ckpt")
    res = run_variant(str(ckpt), "llamacpp-q8_0", new_tokens=4, repeats=1, batch_sizes=[1], device=None)
    assert res.backend == "llamacpp-q8_0" and not res.error
    gguf = next((tmp_path / "cache" / "gguf").glob("*-q8_0.gguf"))
    assert res.llm_weight_bytes == gguf.stat().st_size  # what llama.cpp reads, not the torch copy
    for name in ("prefill_ms", "cold_first_token_ms", "first_token_ms", "second_turn_first_token_ms", "decode_tok_s",
                 "ask_decode_tok_s"):
        value = getattr(res, name)
        assert value > 0 and math.isfinite(value), name
    assert res.batch_tok_s == {}  # batches run in torch, so they are not reported as llama.cpp's
