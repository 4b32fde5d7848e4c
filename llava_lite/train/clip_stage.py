"""Contrastive (CLIP-style) training as a stage kind on the training engine: a dual encoder's
symmetric InfoNCE over each global batch, with checkpoints, `--resume`, metrics, plots,
trackers, a progress bar and several processes, like every LLaVA stage.

With a locked tower (LiT) the tower's pooled features come from the on-disk cache; an unlocked
tower (`model.lock_image=false`) runs inside each step and trains. Under several processes each
computes its share of the batch and the embeddings are gathered (with their gradients), so the
loss sees every negative of the global batch, as in one process.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llava_lite.config import ConfigError
from llava_lite.contrastive import clip_loss
from llava_lite.dual_encoder import DualEncoder
from llava_lite.train.batching import BatchSchedule, shard
from llava_lite.train.clip_data import PairSet, build_pairs
from llava_lite.train.clip_recipe import ClipRecipe
from llava_lite.train.engine import METRICS, STAGE_DONE, EngineRun, StepResult, make_accelerator, run_stage
from llava_lite.train.state import MODEL_DIR

STAGE = "clip"


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each process the summed gradient of its own rows
    (gloo has no reduce-scatter, so: all-reduce, then slice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every process's rows, in rank order, differentiable; `x` itself in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


class ContrastiveModule(nn.Module):
    """What DDP wraps. Every process returns the loss of the whole global batch; the gathered
    gradients are summed over processes and DDP averages them, so each update equals the
    one-process update."""

    def __init__(self, model: DualEncoder) -> None:
        super().__init__()
        self.model = model

    def train(self, mode: bool = True) -> ContrastiveModule:
        super().train(mode)
        self.model.tower.train(False)  # a trained tower keeps its normalisation statistics
        return self

    def forward(self, captions: list[str], labels: torch.Tensor, features: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, hard_negatives: int | None = None) -> torch.Tensor:
        pooled = features if features is not None else self.model.image_features(pixel_values)
        images = gather_rows(self.model.embed_image_features(pooled))
        texts = gather_rows(self.model.embed_texts(captions))
        return clip_loss(images, texts, self.model.logit_scale(), labels=labels.to(images.device),
                         hard_negatives=hard_negatives)


@dataclass(kw_only=True)
class ContrastiveRun(EngineRun):
    """The contrastive stage kind."""

    recipe: ClipRecipe
    pairs: PairSet
    counts: dict[str, int]
    features: torch.Tensor | None  # cached pooled features (locked tower), else None
    schedule: BatchSchedule
    feature_seconds: float = 0.0

    def _batch(self, step: int) -> tuple[list[int], list[str], torch.Tensor]:
        """The global batch of `step`, its captions and positive groups: a pure function of
        (seed, step), so a resumed run draws the same ones."""
        batch = self.schedule.batch(step)
        rng = random.Random(self.recipe.seed * 1_000_003 + step)
        captions = [self.pairs.captions[i](rng) for i in batch]
        ids = {g: k for k, g in enumerate(dict.fromkeys(self.pairs.groups[i] for i in batch))}
        return batch, captions, torch.tensor([ids[self.pairs.groups[i]] for i in batch])

    def accumulate(self, step: int) -> StepResult:
        acc = self.accelerator
        batch, captions, labels = self._batch(step)
        rank, world = acc.process_index, acc.num_processes
        mine = shard(list(range(len(batch))), rank, world)
        inputs: dict[str, Any] = {"captions": [captions[k] for k in mine], "labels": labels,
                                  "hard_negatives": self.recipe.hard_negatives}
        rows = [batch[k] for k in mine]
        if self.features is not None:
            inputs["features"] = self.features[rows].to(acc.device)
        else:
            model = self.unwrapped.model
            inputs["pixel_values"] = model.tower.preprocess([self.pairs.images[i]() for i in rows]).to(acc.device)
        with acc.autocast():
            loss = self.module(**inputs)
        acc.backward(loss)
        return StepResult(loss.item())

    def record(self, step: int, result: StepResult, grad_norm: float, dt: float, elapsed: float) -> dict[str, Any]:
        row = super().record(step, result, grad_norm, dt, elapsed)
        return row | {"lr": self.scheduler.get_last_lr()[0],
                      "logit_scale": round(self.unwrapped.model.logit_scale().item(), 4),
                      "samples_per_s": round(self.recipe.batch_size / dt, 3)}

    def save_model(self, folder: Path, weights: dict[str, torch.Tensor] | None = None) -> None:
        self.unwrapped.model.save_pretrained(folder)

    def load_weights(self, ckpt: Path) -> None:
        self.module.model.load_weights(ckpt / MODEL_DIR)

    def finish(self, result: dict[str, Any], progress: bool) -> None:
        from llava_lite.train.clip_eval import evaluate
        from llava_lite.train.plots import plot_loss

        if not self.main:
            return
        model = self.unwrapped.model.eval()
        model.save_pretrained(self.out / MODEL_DIR)
        plot_loss(self.out / METRICS, self.out / "loss.png", f"{self.recipe.name}: contrastive loss")
        result |= {"data": self.counts, "pairs": len(self.pairs), "feature_seconds": round(self.feature_seconds, 1),
                   "logit_scale": round(model.logit_scale().item(), 4),
                   "mixed_precision": str(self.accelerator.mixed_precision)}
        t_eval = time.perf_counter()
        result["eval"] = evaluate(model, self.recipe, self.out / "eval", progress)
        result["eval_seconds"] = round(time.perf_counter() - t_eval, 2)


def _accelerator(recipe: ClipRecipe, out: Path):
    from accelerate.utils import DistributedType

    accelerator = make_accelerator(recipe.precision, out, recipe.report_to, STAGE, recipe.seed, recipe.num_threads)
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError("the contrastive stage runs data-parallel: launch it without the FSDP config "
                          "(accelerate launch --multi_gpu --num_processes N ...)")
    if recipe.batch_size % accelerator.num_processes:
        raise ConfigError(f"batch_size={recipe.batch_size} does not split into {accelerator.num_processes} processes")
    return accelerator


def _optimizer(model: DualEncoder, recipe: ClipRecipe) -> torch.optim.Optimizer:
    heads = [*model.image_head.parameters(), *model.text_head.parameters(), *model.logit_scale.parameters()]
    groups = [{"params": heads, "lr": recipe.lr, "weight_decay": 0.0, "name": "heads"}]
    text = [p for p in model.text_model.parameters() if p.requires_grad]
    if text:
        groups.append({"params": text, "lr": recipe.text_lr, "weight_decay": recipe.weight_decay, "name": "text"})
    tower = [p for p in model.tower.parameters() if p.requires_grad]
    if tower:
        groups.append({"params": tower, "lr": recipe.tower_lr, "weight_decay": recipe.weight_decay, "name": "tower"})
    return torch.optim.AdamW(groups)


def _tracked_config(recipe: ClipRecipe) -> dict[str, Any]:
    """The hyperparameters shown beside a run in the tracker."""
    return {"recipe": recipe.name, "stage": STAGE, "seed": recipe.seed, "precision": recipe.precision,
            "lr": recipe.lr, "text_lr": recipe.text_lr, "batch_size": recipe.batch_size,
            "lock_image": recipe.model.lock_image, "lock_text": recipe.model.lock_text,
            "tower": recipe.model.vision.name, "text": recipe.model.text.name}


def setup_clip_stage(recipe: ClipRecipe, out: Path, progress: bool = True) -> ContrastiveRun:
    """The dual encoder, its pairs (features cached once, by the main process first), the
    optimizer and the schedule."""
    from transformers import get_cosine_schedule_with_warmup

    accelerator = _accelerator(recipe, out)
    model = DualEncoder(recipe.model)
    if model.config.lock_image:
        model.tower.requires_grad_(False)
    t0 = time.perf_counter()
    with accelerator.main_process_first():
        pairs, counts = build_pairs(model, recipe, progress and accelerator.is_main_process)
    if len(pairs) < recipe.batch_size:
        raise ConfigError(f"only {len(pairs)} training pairs for batch_size={recipe.batch_size}")
    optimizer = _optimizer(model, recipe)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(recipe.warmup_ratio * recipe.steps), recipe.steps)
    module = ContrastiveModule(model).to(accelerator.device)
    return ContrastiveRun(
        name=STAGE, out=out, accelerator=accelerator, label=recipe.name, save_every=recipe.save_every,
        keep_last=recipe.keep_last, max_grad_norm=recipe.max_grad_norm, report_to=recipe.report_to,
        tracked_config=_tracked_config(recipe), module=module, optimizer=optimizer, scheduler=scheduler,
        total=recipe.steps, recipe=recipe, pairs=pairs, counts=counts, features=pairs.feature_tensor(),
        schedule=BatchSchedule([0] * len(pairs), recipe.batch_size, recipe.seed, group_by_length=False),
        feature_seconds=time.perf_counter() - t0)


def run_clip_recipe(recipe: ClipRecipe, output: Path, recipe_file: Path | None = None, progress: bool = True,
                    resume: bool = False) -> dict[str, Any]:
    """Train into OUTPUT (checkpoints in OUTPUT/checkpoints, the model in OUTPUT/model), then
    evaluate into OUTPUT/eval; returns the summary. A finished run is skipped on `resume`."""
    output = Path(output)
    done = output / STAGE_DONE
    if done.is_file():
        if not resume:
            raise ConfigError(f"{output}: this run already finished; pass --resume to skip it or choose another "
                              "--output")
        print(f"[{STAGE}] already finished in {output}; skipping")
        return json.loads(done.read_text())
    output.mkdir(parents=True, exist_ok=True)
    recipe.save(output / "recipe.json")
    if recipe_file is not None:
        shutil.copyfile(recipe_file, output / f"recipe-{recipe.name}.py")
    t0 = time.perf_counter()
    run = setup_clip_stage(recipe, output, progress)
    summary = run_stage(run, resume, progress)
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    if run.main:
        (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
