"""The steps of one training stage: micro-batches collated from packs (and cached tower
features), a token-weighted loss over the global batch, clipped updates, one metrics line per
step, periodic checkpoints, and a clean stop on Ctrl-C or SIGTERM."""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from llava_lite.feature_cache import FeatureCache
from llava_lite.images import load_image
from llava_lite.prompting import IGNORE_INDEX
from llava_lite.train import sharding
from llava_lite.train.batching import BatchSchedule, shard
from llava_lite.train.packing import Pack, pack_attention
from llava_lite.train.precision import frozen_linear_weights
from llava_lite.train.prefix_attention import layout_of, prefix_attention
from llava_lite.train.recipe import StageConfig, TrainRecipe
from llava_lite.train.state import latest_checkpoint, save_train_state
from llava_lite.train.tracking import tracked

METRICS = "metrics.jsonl"
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left intact."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: a checkpoint was saved before stopping."""


@dataclass
class StageData:
    rows: list[Pack]  # training items: single rows, or prefix-shared packs of rows
    problems: list[str]
    label_counts: list[int]
    num_rows: int


@dataclass
class StageRun:
    """Everything one stage's steps share."""

    recipe: TrainRecipe
    stage: StageConfig
    name: str
    out: Path
    accelerator: Any
    processor: Any
    data: StageData
    cache: FeatureCache | None
    cache_seconds: float = 0.0
    module: Any = None
    unwrapped: Any = None  # the TrainModule inside accelerate's wrapper
    optimizer: Any = None
    scheduler: Any = None
    schedule: BatchSchedule | None = None
    total: int = 0

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"


class StopFlag:
    """First Ctrl-C/SIGTERM asks for a save at the end of the current step; a second one stops now."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
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


def collate(packs: list[Pack], processor, cache: FeatureCache | None, tower, packed: bool,
            attention: str = "prefix") -> dict[str, Any]:
    """A micro-batch. Packs attend by `attention`: "prefix" gives a `pack_layout` for
    train/prefix_attention.py beside the padding mask, "mask" the dense block mask."""
    input_ids, attention_mask = processor.pad([p.input_ids for p in packs], side="right")
    labels, _ = processor.pad([p.labels for p in packs], side="right", value=IGNORE_INDEX)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if packed and attention == "prefix":
        width = input_ids.shape[1]
        batch["pack_layout"] = layout_of([p.segments for p in packs], width)
        batch["position_ids"] = processor.pad([p.positions for p in packs], side="right", value=0)[0]
    elif packed:
        batch["attention_mask"], batch["position_ids"] = pack_attention(packs, input_ids.shape[1])
    images = [p for pack in packs for p in pack.images]
    if images:
        if cache is not None:
            batch["vision_features"] = cache.get_many(images).float()
        else:
            batch["pixel_values"] = tower.preprocess([load_image(p) for p in images])
    return batch


def save_step(run: StageRun, step: int) -> None:
    """A checkpoint of `step`; under FSDP every process takes part in gathering it."""
    weights, scale = None, None
    if sharding.is_sharded(run.accelerator):
        weights, scale = sharding.gather_weights(run.module)
        optimizer_state = sharding.gather_optimizer_state(run.module, run.optimizer)
    elif run.main:
        optimizer_state = run.optimizer.state_dict()
        if run.unwrapped.logit_scale is not None:
            scale = run.unwrapped.logit_scale.log_scale.detach()
    if run.main:
        extra = {} if scale is None else {"logit_scale": scale}
        save_train_state(run.ckpt_root, step, run.unwrapped.model, optimizer_state, run.scheduler,
                         {"stage": run.name, "total_steps": run.total}, run.recipe.keep_last, extra,
                         weights=weights)
    run.accelerator.wait_for_everyone()


def _accumulate(run: StageRun, step: int) -> tuple[float, torch.Tensor, int]:
    """Forward and backward over this process's micro-batches of the step's global batch:
    (mean token loss over the global batch, mean contrastive loss, supervised tokens)."""
    acc, stage = run.accelerator, run.stage
    world = acc.num_processes
    global_batch = run.schedule.batch(step)
    n_tokens = sum(run.data.label_counts[i] for i in global_batch)
    mine = shard(global_batch, acc.process_index, world)
    chunks = [mine[i:i + stage.micro_batch_size] for i in range(0, len(mine), stage.micro_batch_size)]
    ce_total = torch.zeros((), device=acc.device)
    con_total = torch.zeros((), device=acc.device)
    for k, idx in enumerate(chunks):
        batch = collate([run.data.rows[i] for i in idx], run.processor, run.cache,
                        run.unwrapped.model.vision_tower, stage.pack_shared_prefix, run.recipe.pack_attention)
        batch = {key: v.to(acc.device) if torch.is_tensor(v) else v for key, v in batch.items()}
        with acc.no_sync(run.module) if k < len(chunks) - 1 else nullcontext():
            with acc.autocast():
                ce_sum, con = run.module(**batch)
            # DDP averages gradients over processes, hence the factor `world`: the step's
            # gradient is that of the mean token loss over the whole global batch.
            loss = ce_sum.float() * world / n_tokens
            if con is not None:
                loss = loss + stage.contrastive_weight * con / len(chunks)
                con_total += con.detach() / len(chunks)
            acc.backward(loss)
        ce_total += ce_sum.detach().float()
    ce_total = acc.reduce(ce_total, "sum")
    return (ce_total / n_tokens).item(), acc.reduce(con_total, "mean"), n_tokens


def _update(run: StageRun, step: int, step_loss: float, trainable: list[torch.Tensor]) -> float:
    """Clip and apply the step's gradients, unless the loss diverged; returns the grad norm."""
    if not math.isfinite(step_loss):
        raise TrainingDivergedError(
            f"[{run.name}] loss is {step_loss} at step {step + 1}; stopped before updating the model. "
            f"Last good checkpoint: {latest_checkpoint(run.ckpt_root) or 'none yet'}. Lower the learning "
            "rate or use fp32/bf16."
        )
    grad_norm = run.accelerator.clip_grad_norm_(trainable, run.stage.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def _record(run: StageRun, step: int, loss: float, con: torch.Tensor, grad_norm: float, n_tokens: int,
            dt: float, elapsed: float) -> dict[str, Any]:
    lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(run.optimizer.param_groups)}
    record = {"stage": run.name, "step": step + 1, "loss": round(loss, 6),
              "lr": lrs.get("lora"), "projector_lr": lrs.get("projector"),
              "grad_norm": round(grad_norm, 5), "samples_per_s": round(run.stage.batch_size / dt, 3),
              "tokens": n_tokens, "tokens_per_s": round(n_tokens / dt, 2), "step_s": round(dt, 3),
              "elapsed_s": round(elapsed, 2)}
    if run.stage.contrastive_weight > 0:
        record["contrastive"] = round(con.item(), 6)
    return record


@contextmanager
def fast_paths(run: StageRun):
    """Under bf16/fp16 autocast the stage's steps run with the frozen LLM weights held in that
    dtype, and with peft's up-cast of a LoRA layer's input to its fp32 weights turned off (autocast
    casts it straight back for the matmul). Both give the same numbers, without the copies."""
    from peft.helpers import disable_input_dtype_casting

    dtype = HALF.get(str(run.accelerator.mixed_precision))
    # Under FSDP the weights are shards, and its mixed-precision policy already computes in dtype.
    if dtype is None or sharding.is_sharded(run.accelerator):
        yield
        return
    llm = run.unwrapped.model.llm
    with frozen_linear_weights(llm, dtype), disable_input_dtype_casting(llm):
        yield


def train_loop(run: StageRun, start: int, progress: bool) -> float:
    """Steps `start`..total with logging, periodic checkpoints and a clean stop on Ctrl-C."""
    trainable = [p for p in run.unwrapped.parameters() if p.requires_grad]
    bar = tqdm(total=run.total, initial=start, desc=run.name, unit="step", disable=not (progress and run.main))
    t_train, last_loss = time.perf_counter(), float("nan")
    run.module.train()
    # Packed rows' attention stays selected for the whole loop, not only inside each forward:
    # gradient checkpointing recomputes the layers during backward, and must attend the same way.
    packed = run.stage.pack_shared_prefix and run.recipe.pack_attention == "prefix"
    scope = prefix_attention(run.unwrapped.model.llm) if packed else nullcontext()
    with StopFlag() as stop, fast_paths(run), scope, open(run.out / METRICS, "a") if run.main else nullcontext() as log:
        for step in range(start, run.total):
            t_step = time.perf_counter()
            last_loss, con, n_tokens = _accumulate(run, step)
            grad_norm = _update(run, step, last_loss, trainable)
            dt = time.perf_counter() - t_step
            if run.main:
                record = _record(run, step, last_loss, con, grad_norm, n_tokens, dt, time.perf_counter() - t_train)
                log.write(json.dumps(record) + "\n")
                log.flush()
                run.accelerator.log(tracked(record), step=step + 1)
                bar.set_postfix(loss=f"{last_loss:.4f}", samples_s=f"{run.stage.batch_size / dt:.1f}")
                bar.update(1)
            done = step + 1
            if done % run.recipe.save_every == 0 or done == run.total or stop.requested:
                save_step(run, done)
            if stop.requested:
                bar.close()
                raise TrainingInterrupted(f"[{run.name}] stopped at step {done}; checkpoint saved. "
                                          "Run again with --resume to continue.")
    bar.close()
    return last_loss
