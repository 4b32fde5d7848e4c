"""End to end from the shell on the default model (real EfficientNet-Lite0 + SmolLM2 weights)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "llava_lite.cli"]


def _photo() -> str:
    import matplotlib

    return str(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, env=env)


def test_ask_and_caption_on_the_default_model():
    ask = _run("ask", _photo(), "What is in the image?", "--max-new-tokens", "16")
    assert ask.returncode == 0, ask.stderr[-2000:]
    assert ask.stdout.strip(), "empty answer"
    assert "first token" in ask.stderr
    cap = _run("caption", _photo(), "--max-new-tokens", "16", "--no-stream")
    assert cap.returncode == 0, cap.stderr[-2000:]
    assert cap.stdout.strip()


def test_bad_image_is_a_clear_cli_error(tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_text("plain text")
    res = _run("ask", str(bad), "What?")
    assert res.returncode == 1
    assert f"{bad}: not an image file" in res.stderr
    assert "Traceback" not in res.stderr


def test_default_model_python_api_and_8bit():
    from llava_lite import LlavaLite
    from llava_lite.quantize import resolve_backend

    m = LlavaLite.from_pretrained(quantize="8bit")
    assert m.quantization == resolve_backend("8bit", torch.device("cpu"))
    answer = m.ask(_photo(), "What is in the image?", max_new_tokens=12)
    assert isinstance(answer, str) and answer
    # the LLM's Linear layers really are int8 now
    from llava_lite.weight_int8 import Int8Linear

    assert any(isinstance(mod, Int8Linear) for mod in m.model.llm.modules())
