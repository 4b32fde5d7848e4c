"""Named datasets that recipes refer to, by exact name.

A training set builder writes LLaVA-format JSON (absolute image paths) under a folder and
returns the file; an evaluation set builder returns exact-match items
(`{"image", "question", "answer", "type"}`). Builders are deterministic by seed, and files
already built are reused.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from llava_lite.data import easyvqa, general_replay, photo_evidence, scenes
from llava_lite.llava_data import write_rows

# Bumped whenever a builder's output changes, so files built by older code are not reused.
BUILD_VERSION = 4
TrainBuilder = Callable[..., list[dict[str, Any]]]
EvalBuilder = Callable[..., list[dict[str, str]]]


def _scene_dir(root: Path) -> Path:
    return root / "scenes"


def generated_scenes(root: Path, split: str, n: int, seed: int) -> list[dict[str, Any]]:
    """`n` generated scenes of `split` (built once under `root`, deterministic in `seed`)."""
    return scenes.generate(split, n, _scene_dir(root), seed=seed)


def _repeated(rows: list[dict[str, Any]], repeat: int) -> list[dict[str, Any]]:
    """`repeat` copies of `rows`, each with its own id (the file is read once, not per copy)."""
    return [{**row, "id": f"{row['id']}-r{k}"} for k in range(repeat) for row in rows]


TRAIN_SETS: dict[str, TrainBuilder] = {
    "easyvqa-captions": lambda root, seed=0, **kw: easyvqa.build_captions("train", seed=seed),
    "easyvqa-vqa": lambda root, seed=0, **kw: easyvqa.build_vqa("train", seed=seed, **kw),
    "easyvqa-presence": lambda root, seed=0, **kw: easyvqa.build_presence("train", seed=seed, **kw),
    "easyvqa-colors": lambda root, seed=0, **kw: easyvqa.build_colors("train", seed=seed, **kw),
    "easyvqa-conversations": lambda root, seed=0, **kw: easyvqa.build_conversations("train", seed=seed, **kw),
    "scenes-captions": lambda root, n=1000, seed=0: scenes.to_captions(
        generated_scenes(root, "train", n, seed), easyvqa.CAPTION_PROMPTS),
    "scenes-vqa": lambda root, n=1000, seed=0, **kw: scenes.to_vqa(
        generated_scenes(root, "train", n, seed), easyvqa.SHORT_ANSWER, seed=seed, **kw),
    "scenes-dialogues": lambda root, n=1000, seed=0, **kw: scenes.to_dialogues(
        generated_scenes(root, "train", n, seed), easyvqa.CAPTION_PROMPTS, **kw),
    "general-replay": lambda root, repeat=1: _repeated(general_replay.load_replay(), repeat),
    "photo-evidence": lambda root, n=3000, seed=0: photo_evidence.build(n, seed=seed),
}

# Sets copied from a committed file rather than generated: cheap, and rebuilt on every use so
# an edited file is never shadowed by an older cached copy.
ALWAYS_REBUILT = {"general-replay"}

EVAL_SETS: dict[str, EvalBuilder] = {
    "easyvqa-test": lambda root, limit=None, seed=0: easyvqa.eval_items("test", limit=limit, seed=seed),
    "scenes-test": lambda root, n=200, seed=0, limit=None: scenes.eval_items(
        generated_scenes(root, "test", n, seed), easyvqa.SHORT_ANSWER)[:limit],
}


def build_train_set(name: str, root: str | Path, **kwargs: Any) -> Path:
    """Write the named training set as JSON under `root` and return its path."""
    if name not in TRAIN_SETS:
        raise KeyError(f"unknown training set {name!r}; known: {sorted(TRAIN_SETS)}")
    root = Path(root)
    suffix = "-".join(f"{k}{v}" for k, v in sorted(kwargs.items()))
    path = root / "sets" / f"{name}-v{BUILD_VERSION}{'-' + suffix if suffix else ''}.json"
    if not path.is_file() or name in ALWAYS_REBUILT:
        write_rows(TRAIN_SETS[name](root, **kwargs), path)
    return path


def build_eval_set(name: str, root: str | Path, **kwargs: Any) -> list[dict[str, str]]:
    if name not in EVAL_SETS:
        raise KeyError(f"unknown evaluation set {name!r}; known: {sorted(EVAL_SETS)}")
    return EVAL_SETS[name](Path(root), **kwargs)
