"""One training stage on accelerate: the model a stage starts from, its data checked up front,
cached tower features, exact resume, and the final model with its stage-end evaluation. The
steps themselves are `llava_lite.train.stepping`."""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llava_lite.checkpoint import PROJECTOR_NAME, build_model, load_model_folder, save_checkpoint
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
from llava_lite.train.packing import pack_rows, single
from llava_lite.train.precision import resolve_precision
from llava_lite.train.prefix_attention import prefix_attention
from llava_lite.train.recipe import StageConfig, TrainRecipe
from llava_lite.train.state import (
    MODEL_DIR,
    clean_partial,
    latest_checkpoint,
    load_train_state,
    read_extra_tensors,
)
from llava_lite.train.stepping import (  # noqa: F401 - the exceptions are part of this module's interface
    METRICS,
    StageData,
    StageRun,
    TrainingDivergedError,
    TrainingInterrupted,
    train_loop,
)
from llava_lite.train.tracking import tracked_config, tracker

STAGE_DONE = "stage.json"


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


def _trim_metrics(path: Path, last_step: int) -> None:
    """On resume, drop metric lines past the checkpoint (they will be logged again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by kill -9
    path.write_text("".join(k + "\n" for k in keep))


def _accelerator(recipe: TrainRecipe, stage: StageConfig, stage_name: str, out: Path):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

    # A micro-batch of text-only rows leaves the projector unused; DDP must allow that.
    precision, why = resolve_precision(recipe.precision)
    accelerator = Accelerator(mixed_precision="no" if precision == "fp32" else precision,
                              cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
                              log_with=tracker(recipe.report_to),
                              project_config=ProjectConfiguration(project_dir=str(out),
                                                                  logging_dir=str(out / "tensorboard")))
    sharding.configure(accelerator)
    if accelerator.is_main_process:
        print(f"[{stage_name}] precision {precision} ({why})", flush=True)
        if sharding.is_sharded(accelerator):
            print(f"[{stage_name}] FSDP2: parameters, gradients and optimizer state sharded over "
                  f"{accelerator.num_processes} processes", flush=True)
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    set_seed(recipe.seed)
    world = accelerator.num_processes
    per_process = stage.batch_size // world
    if stage.batch_size % world or per_process % stage.micro_batch_size:
        raise ConfigError(
            f"{stage_name}: batch_size={stage.batch_size} does not split into {world} process(es) "
            f"x micro_batch_size={stage.micro_batch_size}"
        )
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
    run = StageRun(recipe, stage, stage_name, out, accelerator, processor, data, cache,
                   cache_seconds=time.perf_counter() - t_cache)
    run.module = TrainModule(model, contrastive=stage.contrastive_weight > 0, distill=stage.distill_text)
    run.module.to(accelerator.device)
    run.optimizer = torch.optim.AdamW(_param_groups(run.module, stage), weight_decay=stage.weight_decay)
    run.schedule = BatchSchedule([len(r.input_ids) for r in data.rows], stage.batch_size, recipe.seed,
                                 recipe.group_by_length)
    run.total = stage.max_steps or max(1, math.ceil(stage.epochs * run.schedule.steps_per_epoch))
    run.scheduler = _scheduler(run.optimizer, stage, run.total)
    return run


def _resume(run: StageRun, resume: bool) -> Path | None:
    """The checkpoint to resume from (its weights loaded into the unsharded model), or None."""
    clean_partial(run.ckpt_root)
    last = latest_checkpoint(run.ckpt_root) if resume else None
    if not resume and run.ckpt_root.is_dir() and any(run.ckpt_root.iterdir()):
        raise ConfigError(f"{run.out}: holds checkpoints of an earlier run; pass --resume or choose another --output")
    if last is not None:
        _load_model_weights(run.module, last / MODEL_DIR)
        scale = read_extra_tensors(last).get("logit_scale")
        if scale is not None and run.module.logit_scale is not None:
            run.module.logit_scale.log_scale.data.copy_(scale)
    return last


def _restore_state(run: StageRun, last: Path | None) -> int:
    """After `prepare`: the checkpoint's optimizer, scheduler, RNG and temperature; the step to
    start from. The optimizer state loads into shards under FSDP, so it waits for `prepare`."""
    start = 0
    if last is not None:
        if sharding.is_sharded(run.accelerator):
            load = partial(sharding.load_optimizer_state, run.module, run.optimizer)
        else:
            load = run.optimizer.load_state_dict
        start = load_train_state(last, load, run.scheduler)["step"]
        if run.main:
            print(f"[{run.name}] resumed from {last} at step {start}/{run.total}")
    metrics_path = run.out / METRICS
    if run.main:
        run.out.mkdir(parents=True, exist_ok=True)
        if start:
            _trim_metrics(metrics_path, start)
        elif metrics_path.exists():
            metrics_path.unlink()
    return start


def _finish(run: StageRun, result: dict[str, Any], progress: bool) -> None:
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


def _fit_domain_gate(run: StageRun) -> None:
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


def train_stage(
    recipe: TrainRecipe,
    stage_name: str,
    out_dir: str | Path,
    init_from: Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one stage into `out_dir` (its final model goes to `out_dir/model`)."""
    wall0 = time.perf_counter()
    out = Path(out_dir)
    run = _setup(recipe, stage_name, out, init_from, progress)
    last = _resume(run, resume)
    run.module, run.optimizer = run.accelerator.prepare(run.module, run.optimizer)
    run.unwrapped = run.accelerator.unwrap_model(run.module)
    start = _restore_state(run, last)
    t_train = time.perf_counter()
    if recipe.report_to != "none":
        run.accelerator.init_trackers(f"{recipe.name}-{stage_name}", config=tracked_config(recipe, stage_name))
    try:
        last_loss = train_loop(run, start, progress)  # NaN when no step ran (resumed at the end)
    finally:  # not accelerator.end_training(): it also ends the process group the next stage needs
        for active in run.accelerator.trackers:
            active.finish()
    result: dict[str, Any] = {"stage": stage_name, "steps": run.total, "resumed_from": start,
                              "final_loss": None if math.isnan(last_loss) else last_loss,
                              "train_seconds": round(time.perf_counter() - t_train, 2),
                              "feature_cache_seconds": round(run.cache_seconds, 2), "rows": run.data.num_rows,
                              "packs": len(run.data.rows), "skipped_rows": len(run.data.problems),
                              "mixed_precision": str(run.accelerator.mixed_precision)}
    _finish(run, result, progress)
    if run.main:
        result["wall_seconds"] = round(time.perf_counter() - wall0, 2)
        (out / STAGE_DONE).write_text(json.dumps(result, indent=2) + "\n")
    run.accelerator.wait_for_everyone()
    return result


def _load_model_weights(module: TrainModule, model_dir: Path) -> None:
    """Put a training checkpoint's projector and LoRA weights into the live model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    module.model.projector.load_state_dict(load_file(str(model_dir / PROJECTOR_NAME)), strict=True)
    adapter = model_dir / "adapter" / "adapter_model.safetensors"
    if is_peft(module.model.llm):
        if not adapter.is_file():
            raise FileNotFoundError(f"{adapter}: checkpoint has no LoRA weights to resume from")
        result = set_peft_model_state_dict(module.model.llm, load_file(str(adapter)))
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"{adapter}: unexpected LoRA keys {result.unexpected_keys[:3]}")
