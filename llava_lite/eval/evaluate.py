"""The evaluation each stage runs at its end (exact match on the recipe's eval sets)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from llava_lite.api import LlavaLite
from llava_lite.config import LLAMACPP_MODES
from llava_lite.exact_match import evaluate_exact_match
from llava_lite.llava_data import write_rows
from llava_lite.packaged import cache_dir
from llava_lite.quantize import BACKENDS
from llava_lite.train.recipe import EvalSpec


def run_stage_eval(model, processor, specs: list[EvalSpec], out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Score the live model on each eval set; writes eval.json and per-question predictions."""
    from llava_lite.data.builders import build_eval_set

    if not specs:
        return {}
    lite = LlavaLite(model, processor, source=str(out_dir))
    summary: dict[str, Any] = {}
    for spec in specs:
        items = build_eval_set(spec.name, cache_dir() / "data", **spec.args)
        result = evaluate_exact_match(lite, items, progress=progress, batch_size=spec.batch_size)
        preds = result.pop("predictions")
        write_rows(preds, out_dir / f"eval-{spec.name}.jsonl")
        summary[spec.name] = result
        by_type = ", ".join(f"{k} {v['accuracy']:.1%}" for k, v in result["by_type"].items())
        print(f"[eval] {spec.name}: {result['accuracy']:.2%} of {result['n']} ({by_type})", flush=True)
    (out_dir / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# -- `llava-lite eval` ------------------------------------------------------------------------
EXACT_MATCH_TASKS = {"easyvqa": "easyvqa-test", "scenes": "scenes-test"}


def parse_forms(text: str) -> list[str]:
    """`--forms trained,raw,natural` -> a list, each a known prompt form."""
    from llava_lite.eval.prompt_forms import FORMS

    forms = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in forms if f not in FORMS]
    if unknown or not forms:
        raise argparse.ArgumentTypeError(f"unknown prompt form(s) {unknown}; choose from {', '.join(FORMS)}")
    return forms


def forms_line(task: str, forms: dict[str, Any]) -> str:
    """One line per run: each form's accuracy, e.g. "easyvqa: trained 98.81%, natural 77.30%"."""
    return f"{task}: " + ", ".join(f"{form} {r['accuracy']:.2%} (n={r['n']})" for form, r in forms.items())


def _exact_match_task(lite: LlavaLite, args) -> tuple[dict[str, Any], dict[str, Any]]:
    from llava_lite.data.builders import build_eval_set
    from llava_lite.eval.prompt_forms import evaluate_forms, forms_table

    set_args: dict[str, Any] = {"limit": args.limit}
    if args.task == "scenes":
        set_args["n"] = args.scenes
    items = build_eval_set(EXACT_MATCH_TASKS[args.task], cache_dir() / "data", **set_args)
    result = evaluate_forms(lite, items, args.forms, max_new_tokens=args.max_new_tokens)
    # the first form's figures stay at the top level, where earlier reports had them
    first = result["forms"][args.forms[0]]
    result.update(accuracy=first["accuracy"], n=first["n"], by_type=first["by_type"])
    return result, forms_table(result["forms"])


def cmd_eval(args) -> int:
    import time

    import torch

    from llava_lite.eval.tasks import TASKS, write_table_report

    if args.threads:
        torch.set_num_threads(args.threads)
    lite = None
    if not (args.task == "alignment" and args.stages):
        lite = LlavaLite.from_pretrained(args.model, quantize=args.quantize)
        if lite.config.lora.enabled and not args.no_merge:
            lite.merge_lora()  # same function, twice the decode speed
    out = Path(args.out or f"runs/eval/{args.task}")
    t0 = time.perf_counter()
    task = TASKS.get(args.task, _exact_match_task)
    result, table = task(lite, args)
    seconds = time.perf_counter() - t0
    preds = result.pop("predictions", None)
    result.update(task=args.task, model=str(args.stages or (lite.source if lite else "")),
                  quantization=lite.quantization if lite else "none", seconds=round(seconds, 1))
    write_table_report(out, f"{args.task}: {result['model']}", table, result, percent=args.task not in ("caption",))
    if preds is not None:
        write_rows(preds, out / "predictions.jsonl")
    print((out / "result.md").read_text())
    if "forms" in result:
        print(forms_line(args.task, result["forms"]))
    print(f"{args.task}: {seconds:.0f}s -> {out}")
    return 0


def register(sub) -> None:
    from llava_lite.eval.tasks import TASKS

    p = sub.add_parser(
        "eval", help="evaluate a model: easyvqa, scenes, vqa, caption, pope, photos, alignment, consistency",
        description="Tasks: easyvqa/scenes (exact match by answer type); vqa (VQAv2 soft accuracy on "
                    "--questions); caption (BLEU-1..4, CIDEr-D on --captions COCO json or the generator's "
                    "held-out scenes, plus CHAIR hallucination scores on scenes); pope (yes/no existence "
                    "probes, random/popular/adversarial negatives); easyvqa, scenes, vqa and pope score each "
                    "question in three prompt forms (--forms) side by side; "
                    "alignment (image-text R@K per stage with --stages RUN); consistency (agreement of "
                    "sampled captions); photos (real photos from scikit-image, scikit-learn and matplotlib: named, "
                    "abstained or invented). Writes result.json, result.md, result.png and predictions.jsonl.")
    p.add_argument("--model", default=None, help="checkpoint (default: the built-in model)")
    p.add_argument("--task", required=True, choices=sorted({*EXACT_MATCH_TASKS, *TASKS}),
                   help="evaluation task")
    p.add_argument("--limit", type=int, default=None, help="a seeded random sample of N questions (default: all)")
    p.add_argument("--scenes", type=int, default=200, help="scenes task: number of held-out scenes (default: 200)")
    p.add_argument("--out", default=None, help="report folder (default: runs/eval/TASK)")
    p.add_argument("--quantize", default="none", choices=["none", "8bit", "4bit", *BACKENDS, *LLAMACPP_MODES],
                   help="LLM quantization: 8bit, 4bit or a named backend (default: none)")
    p.add_argument("--max-new-tokens", type=int, default=6,
                   help="answer length cap in the trained and raw forms (default: 6; natural: 32)")
    p.add_argument("--forms", type=parse_forms, default=["trained", "raw", "natural"],
                   help="easyvqa/scenes/vqa/pope: prompt forms, comma-separated: trained (the instruction and the "
                        "question as trained), raw (the instruction and the lowercase question), natural (the "
                        "question alone, the answer read off the reply) (default: all three)")
    p.add_argument("--instruction", default=None,
                   help="vqa/pope: the answer-format instruction of the trained form (default: the demo's)")
    p.add_argument("--no-merge", action="store_true", help="keep the LoRA adapter unmerged")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--questions", default=None, help="vqa: JSON/JSONL rows with image, question, answers")
    p.add_argument("--captions", default=None, help="caption: COCO-format caption annotations (default: scenes)")
    p.add_argument("--image-root", default=None, help="vqa/caption: folder image paths are relative to")
    p.add_argument("--prompt", default=None, help="caption/consistency: the instruction (default: the demo's)")
    p.add_argument("--stages", default=None, help="alignment: a training run folder; scores every stage")
    p.add_argument("--samples", type=int, default=5, help="consistency: captions sampled per image (default: 5)")
    p.add_argument("--temperature", type=float, default=0.8, help="consistency: sampling temperature")
    p.add_argument("--flag-below", type=float, default=0.5,
                   help="consistency: flag images whose agreement is below this (default: 0.5)")
    p.set_defaults(func=cmd_eval)
