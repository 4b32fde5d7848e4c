"""Does visual training keep the LLM's general chat? Text-only questions, base vs trained.

    python -m llava_lite.eval.general_chat --model llava_lite/assets/demo-model --out runs/general_chat.md

Each question carries expected keywords, so the comparison is checkable; both sets of
answers are written side by side for a person to read.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from llava_lite.general_chat import FOLDER

QUESTIONS = FOLDER / "questions.json"


def load_questions(path: Path = QUESTIONS) -> list[dict]:
    """The held-out text-only questions, each with its expected keywords."""
    return json.loads(path.read_text())


def answer_all(lite, questions: list[dict], max_new_tokens: int) -> list[str]:
    return [lite.chat([{"role": "user", "content": q["question"]}], max_new_tokens=max_new_tokens)
            for q in questions]


def hit(answer: str, expect: list[str]) -> bool:
    """Whether any expected keyword appears as a whole word ("8" must not match "80")."""
    low = answer.lower()
    return any(re.search(rf"(?<!\w){re.escape(e.lower())}(?!\w)", low) for e in expect)


def main(argv: list[str] | None = None) -> int:
    import torch

    from llava_lite import LlavaLite, LlavaLiteConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="trained checkpoint (default: the built-in model)")
    p.add_argument("--out", default="runs/general_chat.md", help="markdown report")
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    questions = load_questions()
    trained = LlavaLite.from_pretrained(args.model)
    trained_answers = answer_all(trained.merge_lora() if trained.config.lora.enabled else trained,
                                 questions, args.max_new_tokens)
    # The base: the same LLM and chat template, no adapter (the projector is unused without images).
    base = LlavaLite.from_config(LlavaLiteConfig(llm=trained.config.llm, system_prompt=trained.config.system_prompt),
                                 source="base")
    base_answers = answer_all(base, questions, args.max_new_tokens)
    rows = []
    base_hits = trained_hits = 0
    for q, b, t in zip(questions, base_answers, trained_answers, strict=True):
        hb, ht = hit(b, q["expect"]), hit(t, q["expect"])
        base_hits += hb
        trained_hits += ht
        cell = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
        rows.append(f"| {cell(q['question'])} | {cell(b)} {'✓' if hb else '✗'} | {cell(t)} {'✓' if ht else '✗'} |")
    report = [f"# General chat: base vs {trained.source}", "",
              f"Keyword check: base {base_hits}/{len(questions)}, trained {trained_hits}/{len(questions)}", "",
              "| question | base SmolLM2 | trained |", "|---|---|---|", *rows]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(report) + "\n")
    print("\n".join(report[:3]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
