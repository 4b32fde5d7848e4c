"""One training stage on accelerate: data checked up front, cached tower features, token-
weighted loss over the global batch, periodic atomic checkpoints and exact resume."""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from llava_lite.checkpoint import PROJECTOR_NAME, build_model, load_checkpoint, save_checkpoint
from llava_lite.config import ConfigError, LlavaLiteConfig
from llava_lite.contrastive import LogitScale, clip_loss
from llava_lite.feature_cache import FeatureCache
from llava_lite.images import load_image
from llava_lite.llava_data import DataValidationError, encode_rows, load_rows
from llava_lite.lora import add_lora, is_peft
from llava_lite.packaged import cache_dir
from llava_lite.prompting import IGNORE_INDEX
from llava_lite.train.batching import BatchSchedule, shard
from llava_lite.train.packing import Pack, pack_attention, pack_rows, single
from llava_lite.train.recipe import StageConfig, TrainRecipe
from llava_lite.train.state import clean_partial, latest_checkpoint, load_train_state, save_train_state

METRICS = "metrics.jsonl"
STAGE_DONE = "stage.json"
MODEL_DIR = "model"


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left intact."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: a checkpoint was saved before stopping."""


class TrainModule(nn.Module):
    """What DDP wraps: the model plus the contrastive temperature. Returns the summed token
    cross-entropy of a micro-batch and, when enabled, the CLIP contrastive loss between mean-
    pooled projected image tokens and mean-pooled caption (answer) token embeddings."""

    def __init__(self, model: nn.Module, contrastive: bool) -> None:
        super().__init__()
        self.model = model
        self.logit_scale = LogitScale() if contrastive else None

    def forward(self, input_ids, attention_mask, labels, vision_features=None, pixel_values=None,
                position_ids=None):
        image_embeds = None
        if vision_features is not None or pixel_values is not None:
            image_embeds = self.model.encode_images(pixel_values=pixel_values, vision_features=vision_features)
        extra = {} if position_ids is None else {"position_ids": position_ids}
        out = self.model(input_ids, attention_mask=attention_mask, image_embeds=image_embeds, labels=labels,
                         return_logits=False, **extra)
        ce_sum = out.loss * out.num_label_tokens
        if self.logit_scale is None or image_embeds is None or image_embeds.shape[0] != input_ids.shape[0]:
            return ce_sum, None
        text = self.model.llm.get_input_embeddings()(labels.clamp(min=0))
        mask = (labels != IGNORE_INDEX).unsqueeze(-1).to(text.dtype)
        pooled_text = (text * mask).sum(1) / mask.sum(1).clamp(min=1)
        return ce_sum, clip_loss(image_embeds.mean(1), pooled_text, self.logit_scale())


@dataclass
class StageData:
    rows: list[Pack]  # training items: single rows, or prefix-shared packs of rows
    problems: list[str]
    label_counts: list[int]
    num_rows: int


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
        model, processor = build_model(config, seed=recipe.seed)
    else:
        model, processor = load_checkpoint(init_from, trainable_lora=stage.lora)
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


class _StopFlag:
    """First Ctrl-C/SIGTERM asks for a save at the end of the current step; a second one stops now."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _collate(packs: list[Pack], processor, cache: FeatureCache | None, tower, packed: bool) -> dict[str, torch.Tensor]:
    input_ids, attention_mask = processor.pad([p.input_ids for p in packs], side="right")
    labels, _ = processor.pad([p.labels for p in packs], side="right", value=IGNORE_INDEX)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if packed:
        batch["attention_mask"], batch["position_ids"] = pack_attention(packs, input_ids.shape[1])
    images = [p for pack in packs for p in pack.images]
    if images:
        if cache is not None:
            batch["vision_features"] = cache.get_many(images).float()
        else:
            batch["pixel_values"] = tower.preprocess([load_image(p) for p in images])
    return batch


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


def train_stage(
    recipe: TrainRecipe,
    stage_name: str,
    out_dir: str | Path,
    init_from: Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one stage into `out_dir` (its final model goes to `out_dir/model`)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    wall0 = time.perf_counter()
    stage = recipe.stage(stage_name)
    out = Path(out_dir)
    ckpt_root = out / "checkpoints"
    # A micro-batch of text-only rows leaves the projector unused; DDP must allow that.
    accelerator = Accelerator(mixed_precision="no" if recipe.precision == "fp32" else recipe.precision,
                              cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    main = accelerator.is_main_process
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    set_seed(recipe.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_process = stage.batch_size // world
    if stage.batch_size % world or per_process % stage.micro_batch_size:
        raise ConfigError(
            f"{stage_name}: batch_size={stage.batch_size} does not split into {world} process(es) "
            f"x micro_batch_size={stage.micro_batch_size}"
        )
    model, processor = build_stage_model(recipe, stage, init_from)
    if recipe.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with accelerator.main_process_first():
        data = load_stage_data(recipe, stage, processor, progress=progress and main)
    if main and data.problems:
        print(f"[{stage_name}] skipped {len(data.problems)} bad rows (skip_bad); first: {data.problems[0]}")

    cache = None
    t_cache = time.perf_counter()
    if recipe.cache_features:
        cache = FeatureCache(cache_dir() / "features", model.config.vision)
        images = sorted({p for r in data.rows for p in r.images})
        with accelerator.main_process_first():
            cache.build(images, model.vision_tower, batch_size=recipe.feature_batch_size, progress=progress and main)
    cache_seconds = time.perf_counter() - t_cache

    module = TrainModule(model, contrastive=stage.contrastive_weight > 0)
    module.to(accelerator.device)
    optimizer = torch.optim.AdamW(_param_groups(module, stage), weight_decay=stage.weight_decay)
    schedule = BatchSchedule([len(r.input_ids) for r in data.rows], stage.batch_size, recipe.seed,
                             recipe.group_by_length)
    total = stage.max_steps or max(1, math.ceil(stage.epochs * schedule.steps_per_epoch))
    scheduler = _scheduler(optimizer, stage, total)

    start = 0
    clean_partial(ckpt_root)
    last = latest_checkpoint(ckpt_root) if resume else None
    if not resume and ckpt_root.is_dir() and any(ckpt_root.iterdir()):
        raise ConfigError(f"{out}: holds checkpoints of an earlier run; pass --resume or choose another --output")
    if last is not None:
        _load_model_weights(module, last / "model")
        meta, extra = load_train_state(last, optimizer, scheduler)
        if "logit_scale" in extra and module.logit_scale is not None:
            module.logit_scale.log_scale.data.copy_(extra["logit_scale"])
        start = meta["step"]
        if main:
            print(f"[{stage_name}] resumed from {last} at step {start}/{total}")
    metrics_path = out / METRICS
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if start:
            _trim_metrics(metrics_path, start)
        elif metrics_path.exists():
            metrics_path.unlink()
    module, optimizer = accelerator.prepare(module, optimizer)
    unwrapped: TrainModule = accelerator.unwrap_model(module)
    trainable = [p for p in unwrapped.parameters() if p.requires_grad]
    micro = stage.micro_batch_size

    def save(step: int) -> None:
        if main:
            extra = {}
            if unwrapped.logit_scale is not None:
                extra["logit_scale"] = unwrapped.logit_scale.log_scale.detach()
            save_train_state(ckpt_root, step, unwrapped.model, optimizer, scheduler,
                             {"stage": stage_name, "total_steps": total}, recipe.keep_last, extra)
        accelerator.wait_for_everyone()

    bar = tqdm(total=total, initial=start, desc=stage_name, unit="step", disable=not (progress and main))
    t_train = time.perf_counter()
    last_loss = float("nan")
    module.train()
    with _StopFlag() as stop, open(metrics_path, "a") if main else nullcontext() as log:
        for step in range(start, total):
            t_step = time.perf_counter()
            global_batch = schedule.batch(step)
            n_tokens = sum(data.label_counts[i] for i in global_batch)
            mine = shard(global_batch, rank, world)
            chunks = [mine[i:i + micro] for i in range(0, len(mine), micro)]
            ce_total = torch.zeros((), device=accelerator.device)
            con_total = torch.zeros((), device=accelerator.device)
            for k, idx in enumerate(chunks):
                batch = _collate([data.rows[i] for i in idx], processor, cache, unwrapped.model.vision_tower,
                                 stage.pack_shared_prefix)
                batch = {key: v.to(accelerator.device) for key, v in batch.items()}
                sync = accelerator.no_sync(module) if k < len(chunks) - 1 else nullcontext()
                with sync:
                    with accelerator.autocast():
                        ce_sum, con = module(**batch)
                    # DDP averages gradients over processes, hence the factor `world`: the step's
                    # gradient is that of the mean token loss over the whole global batch.
                    loss = ce_sum.float() * world / n_tokens
                    if con is not None:
                        loss = loss + stage.contrastive_weight * con / len(chunks)
                        con_total += con.detach() / len(chunks)
                    accelerator.backward(loss)
                ce_total += ce_sum.detach().float()
            ce_total = accelerator.reduce(ce_total, "sum")
            con_total = accelerator.reduce(con_total, "mean")
            step_loss = (ce_total / n_tokens).item()
            if not math.isfinite(step_loss):
                raise TrainingDivergedError(
                    f"[{stage_name}] loss is {step_loss} at step {step + 1}; stopped before updating the model. "
                    f"Last good checkpoint: {latest_checkpoint(ckpt_root) or 'none yet'}. Lower the learning "
                    "rate or use fp32/bf16."
                )
            grad_norm = accelerator.clip_grad_norm_(trainable, stage.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            last_loss = step_loss
            dt = time.perf_counter() - t_step
            lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
            if main:
                record = {"stage": stage_name, "step": step + 1, "loss": round(step_loss, 6),
                          "lr": lrs.get("lora"), "projector_lr": lrs.get("projector"),
                          "grad_norm": round(float(grad_norm), 5), "samples_per_s": round(stage.batch_size / dt, 3),
                          "tokens": n_tokens, "step_s": round(dt, 3),
                          "elapsed_s": round(time.perf_counter() - t_train, 2)}
                if stage.contrastive_weight > 0:
                    record["contrastive"] = round(con_total.item(), 6)
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{max(lrs.values()):.2e}",
                                samples_s=f"{stage.batch_size / dt:.1f}")
                bar.update(1)
            done = step + 1
            if done % recipe.save_every == 0 or done == total or stop.requested:
                save(done)
            if stop.requested:
                bar.close()
                raise TrainingInterrupted(f"[{stage_name}] stopped at step {done}; checkpoint saved. "
                                          "Run again with --resume to continue.")
    bar.close()
    train_seconds = time.perf_counter() - t_train
    result: dict[str, Any] = {"stage": stage_name, "steps": total, "resumed_from": start,
                              "final_loss": last_loss, "train_seconds": round(train_seconds, 2),
                              "feature_cache_seconds": round(cache_seconds, 2),
                              "rows": data.num_rows, "packs": len(data.rows), "skipped_rows": len(data.problems)}
    if main:
        unwrapped.model.eval()
        save_checkpoint(unwrapped.model, out / MODEL_DIR)
        from llava_lite.eval.evaluate import run_stage_eval
        from llava_lite.train.plots import plot_loss

        plot_loss(metrics_path, out / "loss.png", title=f"{recipe.name}: {stage_name}")
        t_eval = time.perf_counter()
        result["eval"] = run_stage_eval(unwrapped.model, processor, stage.eval, out, progress=progress)
        result["eval_seconds"] = round(time.perf_counter() - t_eval, 2)
        result["wall_seconds"] = round(time.perf_counter() - wall0, 2)
        (out / STAGE_DONE).write_text(json.dumps(result, indent=2) + "\n")
    accelerator.wait_for_everyone()
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
