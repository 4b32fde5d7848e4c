"""Training step speed on a recipe's stage: several step paths on the same batches, in one run.

    python -m llava_lite.train.bench_steps --recipe demo --stage adapter --steps 8 --curve 20

- reference: packed rows attend under one dense block mask, autocast casts every frozen LLM
  weight at every matmul, and peft up-casts LoRA inputs (the path before prefix_attention.py);
- fast: prefix attention, and under bf16/fp16 autocast `stepping.fast_paths` (frozen weights
  held in that dtype, peft's LoRA input up-cast off);
- compiled: fast, with each decoder layer compiled (`compile_layers=true`,
  train/compiled_layers.py);
- fast-flat, compiled-flat: fast or compiled, on packs whose stems are copied into their
  leaves (`packing.without_stems`: the layout before stems, more tokens for the same rows).
  `fast-flat` is the adapter stage's step as issue 20 first measured it.

Timing: each of the first `--steps` global batches runs forward and backward on every path in
turn (the order alternating), from the same weights and with no update, so each path trains
the same rows; the first batch is warm-up (and the compile). Prints each path's tokens/s (the
tokens its layout feeds the LLM) and supervised tokens/s (the same work for every path) and,
for each path, the median of its per-batch ratios to the first path of `--paths`.
`--curve N` then trains N steps on each path from the same start and prints the loss curves
(and plots them with `--plot`). Prints numbers, asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import torch

from llava_lite.train import engine, stepping
from llava_lite.train.compiled_layers import compiled_layers
from llava_lite.train.packing import without_stems

PATHS = ("reference", "fast", "fast-flat", "compiled", "compiled-flat")


@contextmanager
def _packs(run, flat: bool):
    rows = run.data.rows
    if flat:
        run.data.rows = [without_stems(p) for p in rows]
    try:
        yield
    finally:
        run.data.rows = rows


def _path(run, name: str):
    """Switch `run` to one path; returns the context its steps run in."""
    run.recipe.pack_attention = "mask" if name == "reference" else "prefix"
    if name == "reference":
        return nullcontext()
    scope = ExitStack()
    scope.enter_context(stepping.fast_paths(run))
    if name.startswith("compiled"):
        scope.enter_context(compiled_layers(run.unwrapped.model.llm, run.accelerator.device))
    scope.enter_context(_packs(run, flat=name.endswith("-flat")))
    return scope


def _batch_tokens(run, name: str, step: int) -> int:
    with _packs(run, flat=name.endswith("-flat")):
        return sum(len(run.data.rows[i].input_ids) for i in run.schedule.batch(step))


def _timed(run, name: str, step: int) -> tuple[float, float]:
    with _path(run, name):
        t = time.perf_counter()
        loss, _, _ = stepping._accumulate(run, step)
        dt = time.perf_counter() - t
    run.optimizer.zero_grad(set_to_none=True)
    return dt, loss


def time_paths(run, steps: int, paths: list[str]) -> dict:
    base = paths[0]
    seconds: dict[str, list[float]] = {p: [] for p in paths}
    warmup: dict[str, float] = {}
    tokens: dict[str, list[int]] = {p: [] for p in paths}
    supervised, loss_gap = [], {p: 0.0 for p in paths[1:]}
    for step in range(steps):
        dts, losses = {}, {}
        for name in paths if step % 2 == 0 else paths[::-1]:
            dts[name], losses[name] = _timed(run, name, step)
        for p in paths[1:]:
            loss_gap[p] = max(loss_gap[p], abs(losses[p] - losses[base]))
        if step == 0:
            warmup = {p: round(dts[p], 2) for p in paths}
            continue
        supervised.append(sum(run.data.label_counts[i] for i in run.schedule.batch(step)))
        for p in paths:
            seconds[p].append(dts[p])
            tokens[p].append(_batch_tokens(run, p, step))
    return {"tokens_per_s": {p: round(sum(tokens[p]) / sum(seconds[p]), 1) for p in paths},
            "supervised_tokens_per_s": {p: round(sum(supervised) / sum(seconds[p]), 2) for p in paths},
            "median_step_s": {p: round(statistics.median(seconds[p]), 3) for p in paths},
            f"speedup_over_{base}_median_of_batches": {
                p: round(statistics.median(b / x for b, x in zip(seconds[base], seconds[p], strict=True)), 3)
                for p in paths[1:]},
            f"max_same_batch_loss_gap_to_{base}": loss_gap, "warmup_step_s": warmup,
            "timed_steps": len(supervised)}


def loss_curves(run, steps: int, paths: list[str]) -> dict[str, list[float]]:
    trainable = [p for p in run.unwrapped.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in trainable]
    opt, sched = copy.deepcopy(run.optimizer.state_dict()), copy.deepcopy(run.scheduler.state_dict())
    curves = {}
    for name in paths:
        with torch.no_grad():
            for p, s in zip(trainable, start, strict=True):
                p.copy_(s)
        run.optimizer.load_state_dict(opt)
        run.scheduler.load_state_dict(sched)
        curves[name] = []
        for step in range(steps):
            with _path(run, name):
                loss, _, _ = stepping._accumulate(run, step)
            engine.update(run, step, loss, trainable)
            curves[name].append(round(loss, 5))
    return curves


def _plot(curves: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, label=name, alpha=0.8)
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from llava_lite.recipes import get_recipe
    from llava_lite.settings import apply_overrides
    from llava_lite.train.loop import _setup

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="demo")
    p.add_argument("--stage", default="adapter")
    p.add_argument("--steps", type=int, default=6, help="global batches timed on every path (the first is warm-up)")
    p.add_argument("--curve", type=int, default=0, help="then train this many steps on each path, for the loss curves")
    p.add_argument("--plot", type=Path, help="write the loss curves to this PNG")
    p.add_argument("--paths", default="fast,compiled",
                   help=f"comma-separated, from {', '.join(PATHS)}; ratios are to the first")
    p.add_argument("overrides", nargs="*", help="recipe overrides (key=value)")
    args = p.parse_args(argv)
    paths = args.paths.split(",")
    if len(paths) < 2 or any(x not in PATHS for x in paths) or len(set(paths)) != len(paths):
        p.error(f"--paths: two or more distinct names from {', '.join(PATHS)}; got {args.paths!r}")
    recipe = apply_overrides(get_recipe(args.recipe), [*args.overrides, f"{args.stage}.eval=[]"])
    with tempfile.TemporaryDirectory() as tmp:
        run = _setup(recipe, args.stage, Path(tmp), None, progress=False)
    run.module, run.optimizer = run.accelerator.prepare(run.module, run.optimizer)
    run.unwrapped = run.accelerator.unwrap_model(run.module)
    run.module.train()
    result = {"recipe": args.recipe, "stage": args.stage, "precision": str(run.accelerator.mixed_precision),
              "threads": torch.get_num_threads(), **time_paths(run, args.steps, paths)}
    if args.curve:
        curves = loss_curves(run, args.curve, paths)
        result["loss_curves"] = curves
        result[f"max_curve_gap_to_{paths[0]}"] = {
            p: max(abs(a - b) for a, b in zip(curves[paths[0]], curves[p], strict=True)) for p in paths[1:]}
        if args.plot:
            _plot(curves, args.plot, f"{args.recipe}: {args.stage}, step paths")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
