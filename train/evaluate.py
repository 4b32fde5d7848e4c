"""The evaluation each stage runs at its end (exact match on the recipe's eval sets)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llava_lite.api import LlavaLite
from llava_lite.exact_match import evaluate_exact_match
from llava_lite.packaged import cache_dir
from train.recipe import EvalSpec


def run_stage_eval(model, processor, specs: list[EvalSpec], out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Score the live model on each eval set; writes eval.json and per-question predictions."""
    from data.builders import build_eval_set

    if not specs:
        return {}
    lite = LlavaLite(model, processor, source=str(out_dir))
    summary: dict[str, Any] = {}
    for spec in specs:
        items = build_eval_set(spec.name, cache_dir() / "data", **spec.args)
        result = evaluate_exact_match(lite, items, batch_size=spec.batch_size, progress=progress)
        preds = result.pop("predictions")
        with open(out_dir / f"eval-{spec.name}.jsonl", "w") as fh:
            for p in preds:
                fh.write(json.dumps(p) + "\n")
        summary[spec.name] = result
        by_type = ", ".join(f"{k} {v['accuracy']:.1%}" for k, v in result["by_type"].items())
        print(f"[eval] {spec.name}: {result['accuracy']:.2%} of {result['n']} ({by_type})", flush=True)
    (out_dir / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
