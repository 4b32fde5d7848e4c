"""Training recipes, one readable file each, registered by exact name."""

from __future__ import annotations

import importlib
from pathlib import Path

from llava_lite.train.clip_recipe import ClipRecipe
from llava_lite.train.recipe import TrainRecipe

RECIPES = {
    "demo": "llava_lite.recipes.demo",
    "tiny": "llava_lite.recipes.tiny",
    "llava15-7b": "llava_lite.recipes.llava15_7b",
    "clip-demo": "llava_lite.recipes.clip_demo",  # a dual encoder (llava_lite/train/clip_recipe.py), not a LLaVA model
}


def get_recipe(name: str) -> TrainRecipe | ClipRecipe:
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; known recipes: {sorted(RECIPES)}")
    return importlib.import_module(RECIPES[name]).recipe().validate()


def recipe_source(name: str) -> Path:
    """The recipe's own file, copied into every run folder."""
    module = importlib.import_module(RECIPES[name])
    return Path(module.__file__)
