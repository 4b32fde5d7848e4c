"""The LLaVA stage kind on the training engine (`llava_lite.train.engine`): micro-batches
collated from packs (and cached tower features), a token-weighted loss over the global batch,
its metrics line, and the checkpoint parts that FSDP has to gather."""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llava_lite import checkpoint
from llava_lite.feature_cache import FeatureCache
from llava_lite.train import sharding
from llava_lite.train.batching import BatchSchedule, shard
from llava_lite.train.compiled_layers import compiled_layers
from llava_lite.train.engine import EngineRun, StepResult
from llava_lite.train.packing import Pack, pack_attention
from llava_lite.train.precision import frozen_linear_weights
from llava_lite.train.prefix_attention import layout_of, prefix_attention
from llava_lite.train.recipe import StageConfig, TrainRecipe
from llava_lite.train.stage_end import finish_stage
from llava_lite.train.state import MODEL_DIR, read_extra_tensors

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StageData:
    rows: list[Pack]  # training items: single rows, or prefix-shared packs of rows
    problems: list[str]
    label_counts: list[int]
    num_rows: int


@dataclass(kw_only=True)
class StageRun(EngineRun):
    """A LLaVA stage (align, adapter, instruct, bridge) on the training engine."""

    recipe: TrainRecipe
    stage: StageConfig
    processor: Any
    data: StageData
    cache: FeatureCache | None
    cache_seconds: float = 0.0
    schedule: BatchSchedule | None = None

    def accumulate(self, step: int) -> StepResult:
        loss, con, n_tokens = _accumulate(self, step)
        return StepResult(loss, tokens=n_tokens, extra={"contrastive": con})

    def record(self, step: int, result: StepResult, grad_norm: float, dt: float, elapsed: float) -> dict[str, Any]:
        return _record(self, step, result.loss, result.extra["contrastive"], grad_norm, result.tokens, dt, elapsed)

    def loop_scope(self) -> AbstractContextManager:
        # Packed rows' attention stays selected for the whole loop, not only inside each forward:
        # gradient checkpointing recomputes the layers during backward, and must attend the same way.
        scope = ExitStack()
        scope.enter_context(fast_paths(self))
        llm = self.unwrapped.model.llm
        if self.stage.pack_shared_prefix and self.recipe.pack_attention == "prefix":
            scope.enter_context(prefix_attention(llm))
        if self.stage.compile_layers:
            n = scope.enter_context(compiled_layers(llm, self.accelerator.device))
            if self.main:
                print(f"[{self.name}] torch.compile: {n} decoder layers (compile_layers=true)")
        return scope

    def checkpoint_state(self):
        weights, scale, optimizer_state = None, None, {}
        if sharding.is_sharded(self.accelerator):
            weights, scale = sharding.gather_weights(self.module)
            optimizer_state = sharding.gather_optimizer_state(self.module, self.optimizer)
        elif self.main:
            optimizer_state = self.optimizer.state_dict()
            if self.unwrapped.logit_scale is not None:
                scale = self.unwrapped.logit_scale.log_scale.detach()
        return weights, {} if scale is None else {"logit_scale": scale}, optimizer_state

    def save_model(self, folder: Path, weights: dict[str, torch.Tensor] | None = None) -> None:
        checkpoint.save_checkpoint(self.unwrapped.model, folder, weights=weights)

    def load_weights(self, ckpt: Path) -> None:
        checkpoint.load_weights(self.module.model, ckpt / MODEL_DIR)
        scale = read_extra_tensors(ckpt).get("logit_scale")
        if scale is not None and self.module.logit_scale is not None:
            self.module.logit_scale.log_scale.data.copy_(scale)

    def load_optimizer(self, state: dict[str, Any]) -> None:
        if sharding.is_sharded(self.accelerator):
            sharding.load_optimizer_state(self.module, self.optimizer, state)
        else:
            self.optimizer.load_state_dict(state)

    def finish(self, result: dict[str, Any], progress: bool) -> None:
        result |= {"feature_cache_seconds": round(self.cache_seconds, 2), "rows": self.data.num_rows,
                   "packs": len(self.data.rows), "skipped_rows": len(self.data.problems),
                   "mixed_precision": str(self.accelerator.mixed_precision)}
        finish_stage(self, result, progress)


def collate(packs: list[Pack], processor, cache: FeatureCache | None, packed: bool,
            attention: str = "prefix") -> dict[str, Any]:
    """A micro-batch. Packs attend by `attention`: "prefix" gives a `pack_layout` for
    train/prefix_attention.py beside the padding mask, "mask" the dense block mask."""
    images = [p for pack in packs for p in pack.images]
    prefix = packed and attention == "prefix"
    batch = processor.collate_training(packs, images=images if cache is None else (),
                                       positions=[p.positions for p in packs] if prefix else None)
    width = batch["input_ids"].shape[1]
    if prefix:
        batch["pack_layout"] = layout_of([p.segments for p in packs], width, [p.parents for p in packs])
    elif packed:
        batch["attention_mask"], batch["position_ids"] = pack_attention(packs, width)
    if images and cache is not None:
        batch["vision_features"] = cache.get_many(images).float()
    return batch


def _accumulate(run: StageRun, step: int) -> tuple[float, torch.Tensor, int]:
    """Forward and backward over this process's micro-batches of the step's global batch:
    (mean token loss over the global batch, mean contrastive loss, supervised tokens)."""
    acc, stage = run.accelerator, run.stage
    world = acc.num_processes
    global_batch = run.schedule.batch(step)
    n_tokens = sum(run.data.label_counts[i] for i in global_batch)
    mine = shard(global_batch, acc.process_index, world)
    chunks = [mine[i:i + stage.micro_batch_size] for i in range(0, len(mine), stage.micro_batch_size)]
    if len(chunks) != acc.gradient_accumulation_steps:
        raise RuntimeError(f"{len(chunks)} micro-batches per step, but accelerate accumulates "
                           f"{acc.gradient_accumulation_steps}")
    ce_total = torch.zeros((), device=acc.device)
    con_total = torch.zeros((), device=acc.device)
    for idx in chunks:
        batch = collate([run.data.rows[i] for i in idx], run.processor, run.cache,
                        stage.pack_shared_prefix, run.recipe.pack_attention)
        batch = {key: v.to(acc.device) if torch.is_tensor(v) else v for key, v in batch.items()}
        # accelerate syncs gradients (DDP, FSDP) only on the step's last micro-batch
        with acc.accumulate(run.module):
            with acc.autocast():
                ce_sum, con = run.module(**batch)
            # DDP averages gradients over processes, hence the factor `world`: the step's
            # gradient is that of the mean token loss over the whole global batch.
            loss = ce_sum.float() * world / n_tokens
            if con is not None:
                loss = loss + stage.contrastive_weight * con / len(chunks)
                con_total += con.detach() / len(chunks)
            # accelerate's backward divides by the accumulation steps; this loss is already the
            # micro-batch's share of the global mean (exact for a power-of-two count).
            acc.backward(loss * len(chunks))
        ce_total += ce_sum.detach().float()
    ce_total = acc.reduce(ce_total, "sum")
    return (ce_total / n_tokens).item(), acc.reduce(con_total, "mean"), n_tokens


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
