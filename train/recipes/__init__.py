"""Training recipes, one readable file each, registered by exact name."""

from __future__ import annotations

import importlib
from pathlib import Path

from train.clip_recipe import ClipRecipe
from train.recipe import TrainRecipe

RECIPES = {
    "demo": "train.recipes.demo",
    "tiny": "train.recipes.tiny",
    "llava15-7b": "train.recipes.llava15_7b",
    "clip-demo": "train.recipes.clip_demo",  # a dual encoder (train/clip_recipe.py), not a LLaVA model
}


def get_recipe(name: str) -> TrainRecipe | ClipRecipe:
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; known recipes: {sorted(RECIPES)}")
    return importlib.import_module(RECIPES[name]).recipe().validate()


def recipe_source(name: str) -> Path:
    """The recipe's own file, copied into every run folder."""
    module = importlib.import_module(RECIPES[name])
    return Path(module.__file__)
