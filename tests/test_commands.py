"""The `llava-lite data`, `train` and `eval` commands, and the committed demo model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava_lite.cli import main

FIXTURES = Path(__file__).parent / "fixtures"


def test_data_convert_and_check_from_the_shell(tmp_path, capsys, images):
    out = tmp_path / "coco.jsonl"
    assert main(["data", "convert", "coco-captions", str(FIXTURES / "captions_train2017_sample.json"), str(out),
                 "--image-prefix", "img/"]) == 0
    captured = capsys.readouterr()
    assert "3 rows converted, 2 bad" in captured.out and "empty caption" in captured.err
    (tmp_path / "img").mkdir()
    images[0].save(tmp_path / "img" / "000000391895.jpg")
    # one of the two images is missing: check lists it as file:index and exits 1
    assert main(["data", "check", str(out), "--image-root", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert f"{out}:2:" in captured.out and "not found" in captured.out and "2 good rows, 1 bad" in captured.err


def test_train_lists_recipes_and_rejects_bad_overrides(capsys):
    assert main(["train", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("demo", "tiny", "llava15-7b"))
    assert main(["train", "--recipe", "tiny", "adapter.nope=1"]) == 1
    assert "no such field 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_committed_demo_model_sees_and_eval_writes_reports(tmp_path):
    from llava_lite.api import default_model_path

    assert default_model_path() is not None, "llava_lite/assets/demo-model is missing"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "llava_lite.cli", "eval", "--task", "easyvqa", "--limit", "60",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["n"] == 60 and result["model"] == "default (demo checkpoint)"
    # an untrained projector cannot name shapes; the trained demo model does
    assert result["by_type"]["shape"]["accuracy"] >= 0.9
    assert "| shape |" in (tmp_path / "result.md").read_text()
    assert (tmp_path / "result.png").stat().st_size > 1000
    # every question in each of the three prompt forms, side by side
    assert set(result["forms"]) >= {"trained", "raw", "natural"}
    assert result["forms"]["trained"]["accuracy"] == result["accuracy"]
    assert "| trained | raw | natural |" in (tmp_path / "result.md").read_text().replace(" | natural, no negation", "")
    preds = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 3 * 60 and {p["form"] for p in preds} == {"trained", "raw", "natural"}
    natural = [p for p in preds if p["form"] == "natural"]
    assert not any(p["question"].startswith("Answer each") for p in natural)
    assert sum(p["score"] for p in natural) / 60 == result["forms"]["natural"]["accuracy"]
