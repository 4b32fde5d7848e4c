"""Align-stage step time with cached tower features vs recomputing the tower every step.

    python -m llava_lite.train.bench_align --recipe demo --steps 8

Runs the recipe's align stage twice for a few steps (same data, same batches) and prints the
median step time of each; the first steps are dropped as warm-up. Prints numbers, asserts
nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path


def _median_step(metrics: Path, skip: int) -> float:
    steps = [json.loads(line)["step_s"] for line in metrics.read_text().splitlines()]
    return statistics.median(steps[skip:] or steps)


def main(argv: list[str] | None = None) -> int:
    from llava_lite.recipes import get_recipe
    from llava_lite.settings import apply_overrides
    from llava_lite.train.run import run_recipe

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="demo")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the median")
    p.add_argument("overrides", nargs="*", help="recipe overrides (key=value)")
    args = p.parse_args(argv)
    results = {}
    for cached in (True, False):
        recipe = apply_overrides(get_recipe(args.recipe), [
            *args.overrides, f"align.max_steps={args.steps}", "align.eval=[]",
            f"cache_features={'true' if cached else 'false'}", f"save_every={args.steps}"])
        with tempfile.TemporaryDirectory() as tmp:
            run_recipe(recipe, ["align"], Path(tmp), progress=False)
            results["cached" if cached else "recomputed"] = _median_step(Path(tmp) / "1-align" / "metrics.jsonl",
                                                                         args.skip)
    batch = get_recipe(args.recipe).align.batch_size
    print(json.dumps({"recipe": args.recipe, "align_batch": batch, "median_step_s": results,
                      "speedup": round(results["recomputed"] / results["cached"], 2)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
