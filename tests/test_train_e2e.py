"""Training end to end from the shell: the tiny recipe on the real parts, kill -9 and resume,
and two data-parallel CPU processes (gloo) against one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from launch_helpers import CLI, train_env, train_in_one_and_two_processes

pytestmark = pytest.mark.slow



def _tiny(tiny_llm_dir, tiny_clip_dir) -> list[str]:
    return [f"model.llm.model_id={tiny_llm_dir}", "model.vision.name=clip", f"model.vision.model_id={tiny_clip_dir}"]


def _losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def test_tiny_recipe_runs_every_stage_on_the_default_parts(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([*CLI, "train", "--recipe", "tiny", "--output", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=900, env=train_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("1-align", "2-adapter", "3-instruct"):
        stage = json.loads((out / name / "stage.json").read_text())
        assert stage["steps"] == 4 and stage["final_loss"] < 20
        assert (out / name / "loss.png").is_file() and "scenes-test" in stage["eval"]
    # the trained model loads through the public API and answers
    from llava_lite import LlavaLite

    lite = LlavaLite.from_pretrained(out / "3-instruct" / "model")
    assert isinstance(lite.ask(str(next((Path(os.environ["LLAVA_LITE_CACHE"]) / "data" / "scenes").rglob("*.png"))),
                               "How many shapes are there?", max_new_tokens=4), str)


def test_kill9_at_random_points_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_llm_dir, tiny_clip_dir):
    args = ["train", "--recipe", "tiny", "--no-progress", "--stage", "all", *_tiny(tiny_llm_dir, tiny_clip_dir),
            "align.max_steps=16", "adapter.max_steps=16", "instruct.max_steps=8", "save_every=3",
            "align.eval=[]", "adapter.eval=[]", "instruct.eval=[]"]
    full = tmp_path / "full"
    proc = subprocess.run([*CLI, *args, "--output", str(full)], capture_output=True, text=True, timeout=600,
                          env=train_env())
    assert proc.returncode == 0, proc.stderr[-3000:]

    run = tmp_path / "killed"
    rng = random.Random(1234)
    kills = 0
    for _ in range(4):
        p = subprocess.Popen([*CLI, *args, "--output", str(run), "--resume"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=train_env(), start_new_session=True)
        # wait until training is under way, then kill at a random moment
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None and not list(run.rglob("metrics.jsonl")):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            kills += 1
        p.wait()
    assert kills >= 2
    proc = subprocess.run([*CLI, *args, "--output", str(run), "--resume"], capture_output=True, text=True,
                          timeout=600, env=train_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("1-align", "2-adapter", "3-instruct"):
        assert _losses(run / name / "metrics.jsonl") == pytest.approx(_losses(full / name / "metrics.jsonl"),
                                                                       rel=1e-5, abs=1e-6)
        ckpts = list((run / name / "checkpoints").iterdir())
        assert ckpts and all(c.name.startswith("step-") for c in ckpts)  # no temp folder left behind



def test_two_gloo_processes_match_one_process(tmp_path, tiny_llm_dir, tiny_clip_dir):
    # Same global batch (4): one process runs 2 micro-batches of 2, two processes run one each.
    args = ["train", "--recipe", "tiny", "--no-progress", "--stage", "all", *_tiny(tiny_llm_dir, tiny_clip_dir),
            "align.max_steps=8", "adapter.max_steps=8", "instruct.max_steps=8",
            "align.eval=[]", "adapter.eval=[]", "instruct.eval=[]"]
    train_in_one_and_two_processes(args, tmp_path)
    for name in ("1-align", "2-adapter", "3-instruct"):
        a = _losses(tmp_path / "one" / name / "metrics.jsonl")
        b = _losses(tmp_path / "two" / name / "metrics.jsonl")
        assert len(a) == len(b) == 8
        # the same updates up to float summation order: agree within 1e-4 relative
        assert b == pytest.approx(a, rel=1e-4)
