"""Experiment tracking through accelerate's trackers (`report_to` in a recipe)."""

from __future__ import annotations

import importlib.util
from typing import Any

from llava_lite.config import ConfigError

# report_to -> (the package its accelerate tracker needs, how to get it)
TRACKERS = {"tensorboard": ("tensorboard", "pip install 'llava-lite[tracking]'"),
            "wandb": ("wandb", "pip install wandb")}
# what each step sends, from the metrics.jsonl record
TRACKED = ("loss", "lr", "projector_lr", "grad_norm", "samples_per_s", "tokens_per_s", "contrastive", "logit_scale")


def tracker(report_to: str) -> str | None:
    """The `log_with` for accelerate, after checking its package is installed."""
    if report_to == "none":
        return None
    package, how = TRACKERS[report_to]
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"report_to={report_to} needs the {package} package: {how}")
    return report_to


def tracked(record: dict[str, Any]) -> dict[str, float]:
    """The scalars of one step's metrics record that trackers get."""
    return {f"train/{k}": record[k] for k in TRACKED if record.get(k) is not None}


def tracked_config(recipe, stage_name: str) -> dict[str, Any]:
    """A LLaVA stage's hyperparameters shown beside a run: flat scalars, as TensorBoard's hparams wants."""
    stage = recipe.stage(stage_name)
    return {"recipe": recipe.name, "stage": stage_name, "seed": recipe.seed, "precision": recipe.precision,
            "lr": stage.lr, "projector_lr": stage.projector_lr, "batch_size": stage.batch_size,
            "micro_batch_size": stage.micro_batch_size, "lora": stage.lora,
            "train_projector": stage.train_projector, "llm": recipe.model.llm.model_id}
