"""The one training engine every stage kind runs on (LLaVA stages and contrastive dual-encoder
training alike): accelerate with the chosen precision, the step loop with clipping, a metrics
line per step, trackers and a progress bar, periodic atomic checkpoints, exact resume, a clean
stop on Ctrl-C or SIGTERM, and the stage summary.

A stage kind is an `EngineRun` subclass. It says how one step's gradients are made
(`accumulate`), what a metrics line holds (`record`), how its model is saved and put back
(`save_model`, `load_weights`), and what happens at the end (`finish`).
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from llava_lite.config import ConfigError
from llava_lite.train import sharding
from llava_lite.train.precision import resolve_precision
from llava_lite.train.state import MODEL_DIR, clean_partial, latest_checkpoint, load_train_state, save_train_state
from llava_lite.train.tracking import tracked, tracker

METRICS = "metrics.jsonl"
STAGE_DONE = "stage.json"


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left intact."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: a checkpoint was saved before stopping."""


@dataclass
class StepResult:
    """One optimizer step's forward/backward: the loss to log and what the kind's record adds."""

    loss: float
    tokens: int | None = None  # supervised tokens, where the kind counts them
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class EngineRun:
    """Everything one stage's steps share; subclasses are the stage kinds."""

    name: str
    out: Path
    accelerator: Any
    label: str  # the recipe's name, for plot titles and tracker runs
    save_every: int
    keep_last: int
    max_grad_norm: float
    report_to: str = "none"
    tracked_config: dict[str, Any] = field(default_factory=dict)
    module: Any = None
    unwrapped: Any = None  # the module inside accelerate's wrapper
    optimizer: Any = None
    scheduler: Any = None
    total: int = 0

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    # -- what a stage kind provides ---------------------------------------------------------
    def accumulate(self, step: int) -> StepResult:
        """Forward and backward over this process's share of global batch `step`."""
        raise NotImplementedError

    def record(self, step: int, result: StepResult, grad_norm: float, dt: float, elapsed: float) -> dict[str, Any]:
        return {"stage": self.name, "step": step + 1, "loss": round(result.loss, 6), **result.extra,
                "grad_norm": round(grad_norm, 5), "step_s": round(dt, 3), "elapsed_s": round(elapsed, 2)}

    def loop_scope(self) -> AbstractContextManager:
        """A context held around the whole loop (backward recomputation included)."""
        return nullcontext()

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor], dict[str, Any]]:
        """(gathered weights or None, extra tensors, unsharded optimizer state); every process calls it."""
        return None, {}, self.optimizer.state_dict() if self.main else {}

    def save_model(self, folder: Path, weights: dict[str, torch.Tensor] | None = None) -> None:
        raise NotImplementedError

    def load_weights(self, ckpt: Path) -> None:
        """Put checkpoint `ckpt`'s trained weights into the live (not yet prepared) module."""
        raise NotImplementedError

    def load_optimizer(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def finish(self, result: dict[str, Any], progress: bool) -> None:
        """The final model and the stage-end evaluation; every process calls it."""
        raise NotImplementedError


def make_accelerator(precision: str, out: Path, report_to: str, name: str, seed: int, num_threads: int | None):
    """accelerate's Accelerator at the resolved precision, seeded, with an FSDP launch config
    honoured on CPU and DeepSpeed refused (`sharding.configure`); prints what it chose and why."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

    resolved, why = resolve_precision(precision)
    # Not every step uses every trained parameter (a text-only micro-batch leaves the projector
    # out, a text encoder's pooler is never used); DDP must allow that.
    accelerator = Accelerator(mixed_precision="no" if resolved == "fp32" else resolved,
                              cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
                              log_with=tracker(report_to),
                              project_config=ProjectConfiguration(project_dir=str(out),
                                                                  logging_dir=str(out / "tensorboard")))
    sharding.configure(accelerator)
    if accelerator.is_main_process:
        print(f"[{name}] precision {resolved} ({why})", flush=True)
    if num_threads:
        torch.set_num_threads(num_threads)
    set_seed(seed)
    return accelerator


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


# -- checkpoints and resume -------------------------------------------------------------------
def save_step(run: EngineRun, step: int) -> None:
    """A checkpoint of `step`; under FSDP every process takes part in gathering it."""
    weights, extra_tensors, optimizer_state = run.checkpoint_state()
    if run.main:
        save_train_state(run.ckpt_root, step, lambda folder: run.save_model(folder, weights), optimizer_state,
                         run.scheduler, {"stage": run.name, "total_steps": run.total}, run.keep_last, extra_tensors)
    run.accelerator.wait_for_everyone()


def resume_point(run: EngineRun, resume: bool) -> Path | None:
    """The checkpoint to resume from (its weights loaded into the unprepared module), or None."""
    clean_partial(run.ckpt_root)
    last = latest_checkpoint(run.ckpt_root) if resume else None
    if not resume and run.ckpt_root.is_dir() and any(run.ckpt_root.iterdir()):
        raise ConfigError(f"{run.out}: holds checkpoints of an earlier run; pass --resume or choose another --output")
    if last is not None:
        run.load_weights(last)
    return last


def restore_state(run: EngineRun, last: Path | None) -> int:
    """After `prepare`: the checkpoint's optimizer, scheduler and RNG; the step to start from.
    The optimizer state loads into shards under FSDP, so it waits for `prepare`."""
    start = 0
    if last is not None:
        start = load_train_state(last, run.load_optimizer, run.scheduler)["step"]
        if run.main:
            print(f"[{run.name}] resumed from {last} at step {start}/{run.total}")
    metrics_path = run.out / METRICS
    if run.main:
        run.out.mkdir(parents=True, exist_ok=True)
        if start:
            trim_metrics(metrics_path, start)
        elif metrics_path.exists():
            metrics_path.unlink()
    return start


def trim_metrics(path: Path, last_step: int) -> None:
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


# -- the loop ---------------------------------------------------------------------------------
def update(run: EngineRun, step: int, step_loss: float, trainable: list[torch.Tensor]) -> float:
    """Clip and apply the step's gradients, unless the loss diverged; returns the grad norm."""
    if not math.isfinite(step_loss):
        raise TrainingDivergedError(
            f"[{run.name}] loss is {step_loss} at step {step + 1}; stopped before updating the model. "
            f"Last good checkpoint: {latest_checkpoint(run.ckpt_root) or 'none yet'}. Lower the learning "
            "rate or use fp32/bf16."
        )
    grad_norm = run.accelerator.clip_grad_norm_(trainable, run.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def train_loop(run: EngineRun, start: int, progress: bool) -> float:
    """Steps `start`..total with logging, periodic checkpoints and a clean stop on Ctrl-C;
    returns the last loss (NaN when no step ran)."""
    trainable = [p for p in run.unwrapped.parameters() if p.requires_grad]
    bar = tqdm(total=run.total, initial=start, desc=run.name, unit="step", disable=not (progress and run.main))
    t_train, last_loss = time.perf_counter(), float("nan")
    run.module.train()
    with StopFlag() as stop, run.loop_scope(), open(run.out / METRICS, "a") if run.main else nullcontext() as log:
        for step in range(start, run.total):
            t_step = time.perf_counter()
            result = run.accumulate(step)
            last_loss = result.loss
            grad_norm = update(run, step, last_loss, trainable)
            dt = time.perf_counter() - t_step
            if run.main:
                record = run.record(step, result, grad_norm, dt, time.perf_counter() - t_train)
                log.write(json.dumps(record) + "\n")
                log.flush()  # a crash keeps every logged step
                run.accelerator.log(tracked(record), step=step + 1)
                bar.set_postfix(loss=f"{last_loss:.4f}", samples_s=f"{record.get('samples_per_s', 0):.1f}")
                bar.update(1)
            done = step + 1
            if done % run.save_every == 0 or done == run.total or stop.requested:
                save_step(run, done)
            if stop.requested:
                bar.close()
                raise TrainingInterrupted(f"[{run.name}] stopped at step {done}; checkpoint saved. "
                                          "Run again with --resume to continue.")
    bar.close()
    return last_loss


def run_stage(run: EngineRun, resume: bool, progress: bool) -> dict[str, Any]:
    """Resume point, `prepare`, the loop under the trackers, then the kind's `finish`; writes
    OUTPUT/stage.json and returns the summary."""
    wall0 = time.perf_counter()
    last = resume_point(run, resume)
    run.module, run.optimizer = run.accelerator.prepare(run.module, run.optimizer)
    run.unwrapped = run.accelerator.unwrap_model(run.module)
    start = restore_state(run, last)
    t_train = time.perf_counter()
    if run.report_to != "none":
        run.accelerator.init_trackers(f"{run.label}-{run.name}", config=run.tracked_config)
    try:
        last_loss = train_loop(run, start, progress)
    finally:  # not accelerator.end_training(): it also ends the process group the next stage needs
        for active in run.accelerator.trackers:
            active.finish()
    result: dict[str, Any] = {"stage": run.name, "steps": run.total, "resumed_from": start,
                              "final_loss": None if math.isnan(last_loss) else last_loss,
                              "train_seconds": round(time.perf_counter() - t_train, 2)}
    run.finish(result, progress)
    if run.main:
        result["wall_seconds"] = round(time.perf_counter() - wall0, 2)
        (run.out / STAGE_DONE).write_text(json.dumps(result, indent=2) + "\n")
    run.accelerator.wait_for_everyone()
    return result


__all__ = ["METRICS", "MODEL_DIR", "STAGE_DONE", "EngineRun", "StepResult", "TrainingDivergedError",
           "TrainingInterrupted", "make_accelerator", "run_stage", "save_step", "train_loop"]
