"""Exact-match evaluation of short answers, overall and by answer type."""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_short_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse spaces ("The Circle." -> "circle")."""
    text = _PUNCT.sub(" ", text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def score_exact_match(predictions: Sequence[str], items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy overall and per item `type`; items carry `answer` and optionally `type`."""
    if len(predictions) != len(items):
        raise ValueError(f"{len(predictions)} predictions for {len(items)} items")
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    correct = 0
    for pred, item in zip(predictions, items, strict=True):
        ok = normalize_short_answer(pred) == normalize_short_answer(item["answer"])
        correct += ok
        bucket = hits[item.get("type", "all")]
        bucket[0] += ok
        bucket[1] += 1
    n = len(items)
    return {
        "accuracy": correct / n if n else 0.0,
        "n": n,
        "by_type": {k: {"accuracy": c / t, "n": t} for k, (c, t) in sorted(hits.items())},
    }


def answer_items(
    lite, items: Sequence[dict[str, Any]], max_new_tokens: int = 6, progress: bool = True, batch_size: int = 16,
    desc: str = "evaluating",
) -> list[str]:
    """Greedy answers to `items` ({"image", "question"}), in order.

    Questions about the same image are answered together with `LlavaLite.ask_many`, which
    runs their shared prompt prefix (system prompt and image block) once; images asked once
    are answered `batch_size` at a time with `ask_batch`.
    """
    by_image: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        by_image[str(item["image"])].append(i)
    preds: list[str] = [""] * len(items)
    bar = tqdm(total=len(items), desc=desc, unit="q", disable=not progress, leave=False)
    singles = [idx[0] for idx in by_image.values() if len(idx) == 1]
    for image, idx in by_image.items():
        if len(idx) == 1:
            continue
        answers = lite.ask_many(image, [items[i]["question"] for i in idx], max_new_tokens=max_new_tokens)
        for i, answer in zip(idx, answers, strict=True):
            preds[i] = answer
        bar.update(len(idx))
    # images asked only once (a random sample) gain nothing from a shared prefix: batch them
    for start in range(0, len(singles), batch_size):
        idx = singles[start:start + batch_size]
        answers = lite.ask_batch([items[i]["image"] for i in idx], [items[i]["question"] for i in idx],
                                 batch_size=batch_size, max_new_tokens=max_new_tokens)
        for i, answer in zip(idx, answers, strict=True):
            preds[i] = answer
        bar.update(len(idx))
    bar.close()
    return preds


def evaluate_exact_match(
    lite, items: Sequence[dict[str, Any]], max_new_tokens: int = 6, progress: bool = True, batch_size: int = 16
) -> dict[str, Any]:
    """Greedy answers from a `LlavaLite` for each item (see `answer_items`), scored by exact match."""
    preds = answer_items(lite, items, max_new_tokens, progress, batch_size)
    result = score_exact_match(preds, items)
    result["predictions"] = [
        {"image": str(it["image"]), "question": it["question"], "answer": it["answer"], "prediction": p,
         "type": it.get("type", "all")}
        for it, p in zip(items, preds, strict=True)
    ]
    return result
