"""The end of a LLaVA stage: the final model (gathered under FSDP), the label bridge's domain
gate, the loss plot and the stage-end evaluation."""

from __future__ import annotations

import time
from typing import Any

import torch

from llava_lite.checkpoint import load_model_folder, save_checkpoint
from llava_lite.config import ConfigError, LlavaLiteConfig
from llava_lite.train import sharding
from llava_lite.train.engine import METRICS
from llava_lite.train.state import MODEL_DIR


def finish_stage(run, result: dict[str, Any], progress: bool) -> None:
    """The final model, the loss plot and the stage-end evaluation. Every process calls it
    (FSDP gathers the weights); the main process writes and evaluates."""
    from llava_lite.eval.evaluate import run_stage_eval
    from llava_lite.train.plots import plot_loss

    weights = sharding.gather_weights(run.module)[0] if sharding.is_sharded(run.accelerator) else None
    if not run.main:
        return
    model = run.unwrapped.model
    model.eval()
    if run.stage.fit_domain_gate:
        _fit_domain_gate(run)
    save_checkpoint(model, run.out / MODEL_DIR, weights=weights)
    if weights is not None:  # a sharded model cannot run in one process: evaluate what was saved
        model, _ = load_model_folder(run.out / MODEL_DIR)
    plot_loss(run.out / METRICS, run.out / "loss.png", title=f"{run.recipe.name}: {run.name}")
    t_eval = time.perf_counter()
    result["eval"] = run_stage_eval(model, run.processor, run.stage.eval, run.out, progress=progress)
    result["eval_seconds"] = round(time.perf_counter() - t_eval, 2)


def _fit_domain_gate(run) -> None:
    """The label bridge's gate, fitted on the pooled cached features of every training image."""
    from llava_lite.domain_gate import DomainGate, pooled

    images = sorted({p for r in run.data.rows for p in r.images})
    if not images:
        raise ConfigError(f"{run.name}: fit_domain_gate needs image rows in the stage's data")
    feats = torch.cat([pooled(run.cache.get_many(images[i:i + 256])) for i in range(0, len(images), 256)])
    model = run.unwrapped.model
    model.domain_gate = DomainGate.fit(feats)
    model.config.label_bridge = LlavaLiteConfig.from_dict(run.recipe.model.to_dict()).label_bridge
    print(f"[{run.name}] domain gate fitted on {len(images)} images (threshold {model.domain_gate.threshold:.2f})")
