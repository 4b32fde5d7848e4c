"""`llava-lite bench-train` in its CPU mode (tiny shapes): it runs end to end, and its FLOP
count, which MFU rests on, agrees with torch's own count of the same training step."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llava_lite.train import bench_train
from llava_lite.train.train_flops import sample_flops


@pytest.mark.parametrize("stage", ["align", "lora"])
def test_flop_count_matches_torch_flop_counter(stage):
    parts = bench_train.SHAPES["tiny"]
    torch.manual_seed(0)
    # eager attention: its matmuls are ones the counter sees (CPU sdpa kernels have no formula)
    model = bench_train.build(parts, torch.device("cpu"), torch.float32, attention="eager")
    optimizer, lora = bench_train.prepare_stage(model, parts, stage, gradient_checkpointing=False)
    data = bench_train.batch(model, parts, stage, 2, torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:
        bench_train.train_step(model, optimizer, data, autocast=False)
    counted = sample_flops(bench_train.flop_shape(model), parts.text_tokens[stage], parts.supervised[stage], lora) * 2
    # the formula leaves out what is not a matmul (norms, activations, the optimizer)
    assert counted == pytest.approx(counter.get_total_flops(), rel=0.05)


def test_bench_train_runs_on_cpu_and_writes_its_report(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llava_lite.cli", "bench-train", "--shapes", "tiny", "--steps", "2",
                           "--peak-tflops", "1.0", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench-train.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["align", "lora"]
    for s in report["stages"]:
        assert s["samples_per_s"] > 0 and s["tokens_per_s"] > 0 and s["peak_memory_gib"] > 0
        assert 0 < s["mfu"] < 1 and "hours_1_gpu" not in s  # no LLaVA-1.5 projection at tiny shapes
    lora, align = report["stages"][1], report["stages"][0]
    assert lora["trainable_params"] > align["trainable_params"]  # LoRA weights train in the lora stage
    assert report["decode"]["bf16"]["decode_tok_s"] > 0 and "skipped" in report["decode"]["8bit"]
    assert "MFU" in proc.stdout and "decode" in proc.stdout
