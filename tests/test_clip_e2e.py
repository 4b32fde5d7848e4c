"""The contrastive stage on the training engine, from the shell: kill -9 and resume ends where
an uninterrupted run ends, and two data-parallel CPU processes (gloo) train like one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from launch_helpers import CLI, train_env, train_in_one_and_two_processes
from safetensors.torch import load_file

pytestmark = pytest.mark.slow



def _args(tiny_clip_dir, tiny_text_dir, steps: int, batch: int = 6) -> list[str]:
    return ["train", "--recipe", "clip-demo", "--no-progress", "model.vision.name=clip",
            f"model.vision.model_id={tiny_clip_dir}", f"model.text.model_id={tiny_text_dir}", "model.embed_dim=16",
            'caption_sets=[{"name": "scenes-captions", "args": {"n": 24}}]', "fashion_per_class=0",
            "held_out_classes=[]", "eval_zero_shot=false", "retrieval_set=null", f"steps={steps}",
            # a headless tower has no label space; train the text encoder too, the harder case to resume
            "model.image_prior=none", "model.lock_text=false", "lr=0.001",
            f"batch_size={batch}", "save_every=5", "feature_batch_size=8"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "dual_encoder.safetensors"))


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_clip_kill9_at_set_points_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_clip_dir, tiny_text_dir):
    args = _args(tiny_clip_dir, tiny_text_dir, steps=60)
    full = tmp_path / "full"
    proc = subprocess.run([*CLI, *args, "--output", str(full)], capture_output=True, text=True, timeout=600,
                          env=train_env())
    assert proc.returncode == 0, proc.stderr[-3000:]

    run = tmp_path / "killed"
    kills = 0
    for at in (8, 27, 44):  # logged steps at which the run is killed, mid-interval between checkpoints
        p = subprocess.Popen([*CLI, *args, "--output", str(run), "--resume"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=train_env(), start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None and _lines(run / "metrics.jsonl") < at:
            time.sleep(0.01)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            kills += 1
        p.wait()
    assert kills == 3
    assert not (run / "stage.json").exists()
    proc = subprocess.run([*CLI, *args, "--output", str(run), "--resume"], capture_output=True, text=True,
                          timeout=600, env=train_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    got, want = _metrics(run), _metrics(full)
    assert [r["step"] for r in got] == list(range(1, 61))
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-5, abs=1e-6)
    assert got[-1]["logit_scale"] == pytest.approx(want[-1]["logit_scale"], rel=1e-5)
    a, b = _weights(run), _weights(full)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert all(c.name.startswith("step-") for c in (run / "checkpoints").iterdir())  # no temp folder left



def test_clip_on_two_gloo_processes_matches_one_process(tmp_path, tiny_clip_dir, tiny_text_dir):
    # Each process embeds half of the global batch of 6; the gathered loss sees all 6.
    args = _args(tiny_clip_dir, tiny_text_dir, steps=10)
    train_in_one_and_two_processes(args, tmp_path)
    a, b = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert len(a) == len(b) == 10
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4)
    assert [r["grad_norm"] for r in b] == pytest.approx([r["grad_norm"] for r in a], rel=1e-3)
    wa, wb = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)
