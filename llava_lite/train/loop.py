"""A LLaVA stage set up for the training engine: the model it starts from, its data checked
up front, cached tower features, the optimizer and schedule. The steps are
`llava_lite.train.stepping`; the loop, checkpoints and resume are `llava_lite.train.engine`."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llava_lite.checkpoint import build_model, load_model_folder
from llava_lite.config import ConfigError, LlavaLiteConfig
from llava_lite.contrastive import LogitScale, clip_loss
from llava_lite.feature_cache import FeatureCache
from llava_lite.llava_data import DataValidationError, encode_rows, load_rows
from llava_lite.lora import add_lora, is_peft
from llava_lite.packaged import cache_dir
from llava_lite.prompting import IGNORE_INDEX
from llava_lite.train import sharding
from llava_lite.train.batching import BatchSchedule
from llava_lite.train.distill import token_losses
from llava_lite.train.engine import (  # noqa: F401 - the names a caller of train_stage needs
    MODEL_DIR,
    STAGE_DONE,
    TrainingDivergedError,
    TrainingInterrupted,
    make_accelerator,
    run_stage,
)
from llava_lite.train.packing import pack_rows, single
from llava_lite.train.prefix_attention import prefix_attention
from llava_lite.train.recipe import StageConfig, TrainRecipe
from llava_lite.train.stepping import StageData, StageRun
from llava_lite.train.tracking import tracked_config


class TrainModule(nn.Module):
    """What DDP wraps: the model plus the contrastive temperature. Returns the summed token
    loss of a micro-batch (cross-entropy, or KL to the base LLM on text-only rows) and, when
    enabled, the CLIP contrastive loss between mean-pooled projected image tokens and
    mean-pooled caption (answer) token embeddings."""

    def __init__(self, model: nn.Module, contrastive: bool, distill: bool = False) -> None:
        super().__init__()
        self.model = model
        self.logit_scale = LogitScale() if contrastive else None
        self.distill = distill  # text-only rows learn the base LLM's distribution (train/distill.py)
        # accelerate's FSDP wraps the classes named here as its shard units: the LLM's layers.
        self._no_split_modules = list(getattr(model.llm, "_no_split_modules", None) or [])

    def forward(self, input_ids, attention_mask, labels, vision_features=None, pixel_values=None,
                position_ids=None, pack_layout=None):
        image_embeds = None
        if vision_features is not None or pixel_values is not None:
            image_embeds = self.model.encode_images(pixel_values=pixel_values, vision_features=vision_features)
        extra = {} if position_ids is None else {"position_ids": position_ids}
        if pack_layout is not None:
            extra["pack_layout"] = pack_layout
        with prefix_attention(self.model.llm) if pack_layout is not None else nullcontext():
            ce_sum = token_losses(self.model, input_ids, attention_mask, labels, image_embeds, self.distill, **extra)
        if pack_layout is not None and pack_layout.calls == 0:
            raise ConfigError("this LLM's attention does not dispatch through transformers' AttentionInterface, "
                              "so packed rows would see each other; set pack_attention=mask in the recipe")
        if self.logit_scale is None or image_embeds is None or image_embeds.shape[0] != input_ids.shape[0]:
            return ce_sum, None
        text = self.model.llm.get_input_embeddings()(labels.clamp(min=0))
        mask = (labels != IGNORE_INDEX).unsqueeze(-1).to(text.dtype)
        pooled_text = (text * mask).sum(1) / mask.sum(1).clamp(min=1)
        return ce_sum, clip_loss(image_embeds.mean(1), pooled_text, self.logit_scale())


def load_stage_data(recipe: TrainRecipe, stage: StageConfig, processor, progress: bool = True) -> StageData:
    """Read, validate and tokenize every source before any step; all problems are reported
    together as file:index (or dropped and counted with skip_bad)."""
    from llava_lite.data.builders import build_train_set

    data_root = cache_dir() / "data"
    rows, problems, total = [], [], 0
    for spec in stage.data:
        if spec.name is not None:
            path, root = build_train_set(spec.name, data_root, **spec.args), None
        else:
            path, root = Path(spec.path), spec.image_root
        good, bad = load_rows(path, root, processor.config.image_token, check_images=True, skip_bad=True,
                              limit=spec.limit, progress=progress)
        rows += good
        problems += bad
        total += len(good) + len(bad)
    encoded, bad = encode_rows(rows, processor, skip_bad=True, progress=progress)
    problems += bad
    if problems and not recipe.skip_bad:
        raise DataValidationError(problems, total)
    if not encoded:
        raise ConfigError("no usable training rows")
    if stage.pack_shared_prefix:
        items = pack_rows(encoded, processor.image_token_id, stage.max_pack, processor.config.max_length)
    else:
        items = [single(e) for e in encoded]
    counts = [sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in items]
    return StageData(items, problems, counts, len(encoded))


def build_stage_model(recipe: TrainRecipe, stage: StageConfig, init_from: Path | None):
    """The model a stage starts from: the previous stage's output, or fresh parts."""
    if init_from is None:
        config = LlavaLiteConfig.from_dict(recipe.model.to_dict())
        config.lora.enabled = False
        config.label_bridge.enabled = False  # a stage with fit_domain_gate turns it on
        model, processor = build_model(config, seed=recipe.seed)
    else:
        model, processor = load_model_folder(init_from, trainable_lora=stage.lora)
    if stage.lora and not is_peft(model.llm):
        model.llm = add_lora(model.llm, recipe.model.lora)
        model.config.lora = LlavaLiteConfig.from_dict(recipe.model.to_dict()).lora
        model.config.lora.enabled = True
    for name, param in model.llm.named_parameters():
        param.requires_grad_(stage.lora and "lora_" in name)
    for param in model.projector.parameters():
        param.requires_grad_(stage.train_projector)
    return model, processor


def _param_groups(module: TrainModule, stage: StageConfig) -> list[dict[str, Any]]:
    groups = []
    projector = [p for p in module.model.projector.parameters() if p.requires_grad]
    if module.logit_scale is not None:
        projector += list(module.logit_scale.parameters())
    lora = [p for p in module.model.llm.parameters() if p.requires_grad]
    if projector:
        groups.append({"params": projector, "lr": stage.projector_lr, "name": "projector"})
    if lora:
        groups.append({"params": lora, "lr": stage.lr, "name": "lora"})
    return groups


def _scheduler(optimizer, stage: StageConfig, total: int):
    from transformers import get_cosine_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

    warmup = int(round(stage.warmup_ratio * total))
    if stage.min_lr_ratio > 0:
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total, min_lr_rate=stage.min_lr_ratio)
    return get_cosine_schedule_with_warmup(optimizer, warmup, total)


def _accelerator(recipe: TrainRecipe, stage: StageConfig, stage_name: str, out: Path):
    accelerator = make_accelerator(recipe.precision, out, recipe.report_to, stage_name, recipe.seed,
                                   recipe.num_threads)
    if accelerator.is_main_process and sharding.is_sharded(accelerator):
        print(f"[{stage_name}] FSDP2: parameters, gradients and optimizer state sharded over "
              f"{accelerator.num_processes} processes", flush=True)
    world = accelerator.num_processes
    per_process = stage.batch_size // world
    if stage.batch_size % world or per_process % stage.micro_batch_size:
        raise ConfigError(
            f"{stage_name}: batch_size={stage.batch_size} does not split into {world} process(es) "
            f"x micro_batch_size={stage.micro_batch_size}"
        )
    accelerator.gradient_accumulation_steps = per_process // stage.micro_batch_size
    return accelerator


def _setup(recipe: TrainRecipe, stage_name: str, out: Path, init_from: Path | None, progress: bool) -> StageRun:
    """Model, data and cached features, in the order that keeps runs reproducible."""
    stage = recipe.stage(stage_name)
    accelerator = _accelerator(recipe, stage, stage_name, out)
    main = accelerator.is_main_process
    model, processor = build_stage_model(recipe, stage, init_from)
    if recipe.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with accelerator.main_process_first():
        data = load_stage_data(recipe, stage, processor, progress=progress and main)
    if main and data.problems:
        print(f"[{stage_name}] skipped {len(data.problems)} bad rows (skip_bad); first: {data.problems[0]}")
    cache, t_cache = None, time.perf_counter()
    if recipe.cache_features:
        cache = FeatureCache(cache_dir() / "features", model.config.vision)
        images = sorted({p for r in data.rows for p in r.images})
        with accelerator.main_process_first():
            cache.build(images, model.vision_tower, batch_size=recipe.feature_batch_size, progress=progress and main)
    run = StageRun(name=stage_name, out=out, accelerator=accelerator, label=recipe.name,
                   save_every=recipe.save_every, keep_last=recipe.keep_last, max_grad_norm=stage.max_grad_norm,
                   report_to=recipe.report_to, tracked_config=tracked_config(recipe, stage_name),
                   recipe=recipe, stage=stage, processor=processor, data=data, cache=cache,
                   cache_seconds=time.perf_counter() - t_cache)
    run.module = TrainModule(model, contrastive=stage.contrastive_weight > 0, distill=stage.distill_text)
    run.module.to(accelerator.device)
    run.optimizer = torch.optim.AdamW(_param_groups(run.module, stage), weight_decay=stage.weight_decay)
    run.schedule = BatchSchedule([len(r.input_ids) for r in data.rows], stage.batch_size, recipe.seed,
                                 recipe.group_by_length)
    run.total = stage.max_steps or max(1, math.ceil(stage.epochs * run.schedule.steps_per_epoch))
    run.scheduler = _scheduler(run.optimizer, stage, run.total)
    return run


def train_stage(
    recipe: TrainRecipe,
    stage_name: str,
    out_dir: str | Path,
    init_from: Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one stage into `out_dir` (its final model goes to `out_dir/model`)."""
    run = _setup(recipe, stage_name, Path(out_dir), init_from, progress)
    return run_stage(run, resume, progress)
