"""POPE: yes/no existence probes ("Is there a X in the image?") with random, popular and
adversarial negatives, built from any per-image object annotations, and their scores."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

STRATEGIES = ("random", "popular", "adversarial")


def build_probes(
    objects: Mapping[str, set[str]],
    strategy: str,
    per_image: int = 3,
    seed: int = 0,
    template: str = "Is there a {} in the image?",
) -> list[dict[str, Any]]:
    """`per_image` present objects (yes) and as many absent ones (no) per image.

    Negatives: "random" absent objects; "popular" the most frequent objects overall that are
    absent; "adversarial" the objects that most often co-occur with the present ones.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}; use one of {STRATEGIES}")
    rng = random.Random(seed)
    vocab = sorted(set().union(*objects.values())) if objects else []
    freq = Counter(o for objs in objects.values() for o in objs)
    co = Counter()
    for objs in objects.values():
        for a, b in combinations(sorted(objs), 2):
            co[a, b] += 1
            co[b, a] += 1
    probes = []
    for image in sorted(objects):
        present = sorted(objects[image])
        absent = [o for o in vocab if o not in objects[image]]
        if not present or not absent:
            continue
        n = min(per_image, len(present), len(absent))
        positives = rng.sample(present, n)
        if strategy == "random":
            negatives = rng.sample(absent, n)
        elif strategy == "popular":
            negatives = sorted(absent, key=lambda o: (-freq[o], o))[:n]
        else:
            negatives = sorted(absent, key=lambda o: (-sum(co[p, o] for p in present), -freq[o], o))[:n]
        for obj in positives:
            probes.append({"image": image, "object": obj, "question": template.format(obj), "answer": "yes"})
        for obj in negatives:
            probes.append({"image": image, "object": obj, "question": template.format(obj), "answer": "no"})
    return probes


def parse_yes_no(text: str) -> str:
    """POPE's reading of a free-form reply: "no" if it says no or not, else "yes"."""
    words = [w.strip(".,!?;:\"'") for w in text.lower().split()]
    if not words:
        return "no"
    if words[0] in ("yes", "no"):
        return words[0]
    return "no" if ("no" in words or "not" in words or "none" in words) else "yes"


def pope_metrics(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall and F1 with "yes" as the positive class, and yes-ratio."""
    if len(predictions) != len(answers) or not answers:
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    pred = [parse_yes_no(p) for p in predictions]
    tp = sum(p == "yes" and a == "yes" for p, a in zip(pred, answers, strict=True))
    fp = sum(p == "yes" and a == "no" for p, a in zip(pred, answers, strict=True))
    tn = sum(p == "no" and a == "no" for p, a in zip(pred, answers, strict=True))
    fn = sum(p == "no" and a == "yes" for p, a in zip(pred, answers, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / len(answers), "precision": precision, "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / len(answers), "n": len(answers), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }
