"""One question asked three ways, scored side by side: the form a model was trained on, and the
forms people meet it in.

- `trained`: the answer-format instruction, then the question as training wrote it
  ("Answer each question with a single word.\\nWhat shape is present?"); exact match;
- `raw`: the same instruction, then the question in lowercase as the dataset (easy-VQA) or a
  person writes it ("what shape is present?"); exact match;
- `natural`: the lowercase question alone, with no instruction, as people type it in a chat;
  the reply is read by `extract_answer` among the answers of the question's type, so
  "The shape is a circle." counts as "circle".

Items carry `question` (the trained form), `raw` (the question without any instruction) and
`instruction`; `negated` marks questions whose yes/no convention is the dataset's own
("is there not a circle?"), which the natural form reports with and without.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from llava_lite.answer_extraction import answer_tokens, extract_answer
from llava_lite.data.easyvqa import is_negated
from llava_lite.exact_match import answer_items

FORMS = ("trained", "raw", "natural")
NO_NEGATION = "natural, no negation"
NATURAL_MAX_NEW_TOKENS = 32  # room for a sentence: the natural form gives no length instruction


def phrase(item: dict[str, Any], form: str) -> str:
    """The question of `item` as asked in `form`."""
    if form == "trained":
        return item["question"]
    if "raw" not in item:
        raise ValueError(f"item {item.get('question')!r} has no 'raw' question, so only the trained form exists")
    raw = item["raw"].strip().lower()
    if form == "raw":
        return f"{item['instruction']}\n{raw}" if item.get("instruction") else raw
    if form == "natural":
        return raw
    raise ValueError(f"unknown prompt form {form!r}; known: {', '.join(FORMS)}")


def answer_vocabulary(items: Sequence[dict[str, Any]]) -> dict[str, set[str]]:
    """The reference answers of each question type: the answers the extractor may read off a
    reply to a question of that type (a colour question's reply is read for colours only, as a
    person reads "There is a small red circle." as "red" when asked the colour)."""
    vocab: dict[str, set[str]] = defaultdict(set)
    for it in items:
        vocab[it.get("type", "all")] |= {a for a in it.get("answers", [it.get("answer", "")]) if a}
    return dict(vocab)


def read_reply(reply: str, item: dict[str, Any], form: str, vocabulary: dict[str, set[str]]) -> str:
    """The answer a scorer compares: the reply itself, or for `natural` the answer read off it."""
    if form != "natural":
        return reply
    return extract_answer(reply, item.get("raw", item["question"]), vocabulary[item.get("type", "all")])


def summarize(hits: Sequence[float], items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean score overall and per item `type`."""
    by_type: dict[str, list[float]] = defaultdict(list)
    for h, it in zip(hits, items, strict=True):
        by_type[it.get("type", "all")].append(float(h))
    n = len(hits)
    return {"accuracy": sum(hits) / n if n else 0.0, "n": n,
            "by_type": {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(by_type.items())}}


def exact(answer: str, item: dict[str, Any]) -> float:
    """Exact match after normalisation (number words count as digits)."""
    return float(answer_tokens(answer) == answer_tokens(item["answer"]))


def evaluate_forms(
    lite, items: Sequence[dict[str, Any]], forms: Sequence[str] = FORMS, max_new_tokens: int = 6,
    score: Callable[[str, dict[str, Any]], float] = exact, progress: bool = True, batch_size: int = 16,
) -> dict[str, Any]:
    """Greedy replies to every item in each form, scored by `score(answer, item)`.

    Returns {"forms": {form: summary}, "predictions": [...]}; when the set holds negated
    questions, the natural form is also summarised without them (`NO_NEGATION`)."""
    vocabulary = answer_vocabulary(items)
    results: dict[str, Any] = {}
    predictions: list[dict[str, Any]] = []
    for form in forms:
        asked = [{**it, "question": phrase(it, form)} for it in items]
        tokens = NATURAL_MAX_NEW_TOKENS if form == "natural" else max_new_tokens
        replies = answer_items(lite, asked, tokens, progress=progress, batch_size=batch_size, desc=form)
        read = [read_reply(r, it, form, vocabulary) for r, it in zip(replies, items, strict=True)]
        hits = [score(a, it) for a, it in zip(read, items, strict=True)]
        results[form] = summarize(hits, items)
        if form == "natural":
            kept = [i for i, it in enumerate(items) if not is_negated(it.get("raw", it["question"]))]
            if len(kept) < len(items):
                results[NO_NEGATION] = summarize([hits[i] for i in kept], [items[i] for i in kept])
        predictions += [{**{k: it[k] for k in ("image", "answer", "answers", "type") if k in it}, "form": form,
                         "question": q["question"], "prediction": r, "read": a, "score": h}
                        for it, q, r, a, h in zip(items, asked, replies, read, hits, strict=True)]
    return {"forms": results, "predictions": predictions}


def forms_table(forms: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Rows: answer types and "all"; columns: one accuracy per form, and n (of the first form)."""
    first = next(iter(forms.values()))
    table: dict[str, dict[str, float]] = {}
    for kind in [*first["by_type"], "all"]:
        row: dict[str, float] = {}
        for form, r in forms.items():
            cell = r if kind == "all" else r["by_type"].get(kind)
            if cell is not None:
                row[form] = cell["accuracy"]
        row["n"] = first["n"] if kind == "all" else first["by_type"][kind]["n"]
        table[kind] = row
    return table
