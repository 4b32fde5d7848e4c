"""Chaining the stages: each starts from the previous stage's output folder."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from llava_lite.checkpoint import is_model_folder
from llava_lite.config import ConfigError
from llava_lite.train.loop import MODEL_DIR, STAGE_DONE, train_stage
from llava_lite.train.recipe import STAGES, TrainRecipe


def stage_dir(output: Path, name: str) -> Path:
    return output / f"{STAGES.index(name) + 1}-{name}"


def last_model_dir(recipe: TrainRecipe, output: Path, stages: list[str] | None = None) -> Path:
    """The model folder of the last enabled stage among `stages` (default: all of them)."""
    enabled = [s for s in STAGES if recipe.stage(s).enabled]
    chosen = [s for s in enabled if stages is None or s in stages] or enabled
    return stage_dir(output, chosen[-1]) / MODEL_DIR


def run_recipe(
    recipe: TrainRecipe,
    stages: list[str],
    output: str | Path,
    resume: bool = False,
    recipe_file: Path | None = None,
    progress: bool = True,
    init_from: Path | None = None,
) -> dict[str, Any]:
    """Run `stages` (in pipeline order) into `output`; returns each stage's summary.

    `init_from`: a model folder the first stage run starts from, in place of the previous
    stage's output (e.g. continue a published model with one more stage).

    A completed stage is skipped on --resume; a stage whose predecessor has not finished is
    an error, since it starts from that stage's model.
    """
    output = Path(output)
    if init_from is not None and not is_model_folder(init_from):
        raise ConfigError(f"{init_from}: --init needs a llava-lite checkpoint or a transformers llava-hf folder")
    output.mkdir(parents=True, exist_ok=True)
    recipe.save(output / "recipe.json")
    if recipe_file is not None:
        shutil.copyfile(recipe_file, output / f"recipe-{recipe.name}.py")
    summary: dict[str, Any] = {}
    previous: Path | None = Path(init_from) if init_from is not None else None
    t0 = time.perf_counter()
    for name in STAGES:
        stage = recipe.stage(name)
        folder = stage_dir(output, name)
        if not stage.enabled:
            continue
        done = (folder / STAGE_DONE).is_file()
        if name not in stages:
            if done and init_from is None:
                previous = folder / MODEL_DIR
            continue
        if done and not resume:
            raise ConfigError(f"{folder}: stage {name} already finished; pass --resume to skip it "
                              "or choose another --output")
        if done:
            print(f"[{name}] already finished in {folder}; skipping")
            summary[name] = json.loads((folder / STAGE_DONE).read_text())
            previous = folder / MODEL_DIR
            continue
        first_enabled = next(s for s in STAGES if recipe.stage(s).enabled)
        if previous is None and name != first_enabled:
            raise ConfigError(f"stage {name} starts from the previous stage's model, which is not in {output}; "
                              "run the earlier stage first (or --stage all)")
        summary[name] = train_stage(recipe, name, folder, init_from=previous, resume=resume, progress=progress)
        previous = folder / MODEL_DIR
    summary["total_seconds"] = round(time.perf_counter() - t0, 2)
    return summary
