"""`llava-lite train`: run a recipe's stages (registered as a llava-lite subcommand)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def cmd_train(args) -> int:
    from llava_lite.recipes import RECIPES, get_recipe, recipe_source
    from llava_lite.settings import apply_overrides
    from llava_lite.train.clip_recipe import ClipRecipe
    from llava_lite.train.recipe import STAGES
    from llava_lite.train.run import last_model_dir, run_recipe

    if args.list:
        for name in sorted(RECIPES):
            print(f"{name:12s} {recipe_source(name)}")
        return 0
    if not args.recipe:
        print("llava-lite train: error: --recipe is required (see --list)", file=sys.stderr)
        return 2
    recipe = get_recipe(args.recipe)
    if args.overrides:
        recipe = apply_overrides(recipe, args.overrides)
    if args.report_to:
        recipe.report_to = args.report_to
        recipe.validate()
    if isinstance(recipe, ClipRecipe):
        return _train_clip(recipe, args)
    if args.skip_bad:
        recipe.skip_bad = True
    stages = list(STAGES) if args.stage == "all" else [args.stage]
    output = Path(args.output or f"runs/{recipe.name}")
    summary, code = _guarded(lambda: run_recipe(recipe, stages, output, resume=args.resume,
                                                recipe_file=recipe_source(args.recipe),
                                                progress=not args.no_progress, init_from=args.init))
    if summary is not None and int(os.environ.get("RANK", "0")) == 0:  # one summary per launch, not per process
        _report(summary, last_model_dir(recipe, output, stages), args.publish)
    return code


def _guarded(train) -> tuple[dict | None, int]:
    """Run `train`; a diverged or interrupted run becomes its message and exit code."""
    from llava_lite.train.engine import TrainingDivergedError, TrainingInterrupted

    try:
        return train(), 0
    except TrainingDivergedError as err:
        print(f"llava-lite train: error: {err}", file=sys.stderr)
        return None, 1
    except TrainingInterrupted as err:
        print(f"\nllava-lite train: {err}", file=sys.stderr)
        return None, 130


def _train_clip(recipe, args) -> int:
    """A dual-encoder recipe: one contrastive stage on the same engine."""
    from llava_lite.recipes import recipe_source
    from llava_lite.train.clip_stage import run_clip_recipe

    refused = [flag for flag, used in (("--stage", args.stage != "all"), ("--init", args.init),
                                       ("--skip-bad", args.skip_bad), ("--publish", args.publish)) if used]
    if refused:  # one stage, built-in caption sets, and no LLaVA model to publish
        print(f"llava-lite train: error: {', '.join(refused)} do(es) not apply to the dual-encoder recipe "
              f"{recipe.name!r}", file=sys.stderr)
        return 2
    output = Path(args.output or f"runs/{recipe.name}")
    summary, code = _guarded(lambda: run_clip_recipe(recipe, output, recipe_source(args.recipe),
                                                     progress=not args.no_progress, resume=args.resume))
    if summary is not None and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
        print(f"done: dual encoder in {output / 'model'}, evaluation in {output / 'eval'}")
    return code


def _report(summary: dict, final: Path, publish_to: str | None) -> None:
    print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "eval"} if isinstance(v, dict) else v)
                      for k, v in summary.items()}, indent=2))
    print(f"done: final model in {final}")
    if publish_to:
        from llava_lite.train.publish import publish

        print(f"published (fp16 weights) to {publish(final, publish_to)}")


def register(sub: argparse._SubParsersAction) -> None:
    from llava_lite.train.recipe import REPORT_TO, STAGES

    p = sub.add_parser(
        "train", help="run a training recipe (align -> adapter -> instruct -> bridge)",
        description="Run a recipe's stages. Each stage starts from the previous stage's output folder "
                    "(OUTPUT/1-align/model, ...). Overrides are key=value on the recipe, e.g. "
                    "adapter.max_steps=50 model.llm.model_id=/path/to/llm.",
    )
    p.add_argument("--recipe", help="recipe name (see --list)")
    p.add_argument("--stage", default="all", choices=[*STAGES, "all"],
                   help="which stage to run (default: all, chained)")
    p.add_argument("--init", type=Path, metavar="MODEL_DIR",
                   help="start the first stage run from this llava-lite checkpoint or transformers llava-hf "
                        "folder instead of the previous stage's output "
                        "(e.g. --stage bridge --init llava_lite/assets/demo-model)")
    p.add_argument("--output", help="run folder (default: runs/RECIPE)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint (model, optimizer, scheduler, RNG, data position)")
    p.add_argument("--skip-bad", action="store_true", help="drop malformed rows (counted) instead of failing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--report-to", choices=REPORT_TO, default=None,
                   help="also log loss, learning rate and throughput to this tracker, in OUTPUT/STAGE/tensorboard "
                        "for tensorboard (default: the recipe's report_to, none)")
    p.add_argument("--publish", metavar="DIR", help="also write the final model to DIR as a compact fp16 checkpoint "
                   "(llava_lite/assets/demo-model is the built-in default model)")
    p.add_argument("--list", action="store_true", help="list the recipes and exit")
    p.add_argument("overrides", nargs="*", help="recipe overrides as key=value (values parsed as JSON)")
    p.set_defaults(func=cmd_train)

    from llava_lite.train.bench_train import register as register_bench_train

    register_bench_train(sub)
