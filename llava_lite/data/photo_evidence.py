"""Training rows for the label bridge: what to say about a photo, from the head's guesses alone.

No photo is needed. Each row samples a label distribution shaped like the ImageNet head's on
real photos (sometimes one class near certain, often a few at 20-60%, sometimes nothing
above a few percent), writes it as the bridge's evidence text (`llava_lite.label_bridge`,
the same function inference uses) and asks a question as people type it. The answer names
what the head is sure of, and otherwise says it cannot tell and offers the guesses. Details
a classifier cannot give (colours, counts, positions) are declined.
"""

from __future__ import annotations

import random
from typing import Any

from llava_lite.config import LabelBridgeConfig
from llava_lite.data.surface import typed
from llava_lite.label_bridge import evidence_text, indefinite, verdict
from llava_lite.vision.efficientnet import imagenet_class_names

WHAT = ["what is in this picture?", "what is this?", "what's in the image?", "what do you see?",
        "describe the image.", "describe the picture in detail.", "what is shown here?",
        "what does this photo show?", "can you tell me what this is?", "what is in the photo?",
        "describe the image in one sentence.", "what am i looking at?", "what's this a picture of?",
        "tell me about this image."]
YES_NO = ["is this {x}?", "is there {x} in the picture?", "is it {x}?", "does this show {x}?"]
DETAIL = ["what color is it?", "how many are there?", "where is it in the picture?", "what color is the background?",
          "how many objects are in the image?", "is it on the left or the right?"]


def sample_classes(names: list[str], rng: random.Random) -> list[tuple[str, float]]:
    """A top-3 like the head's on a real photo: confident, unsure, or lost."""
    kind = rng.random()
    if kind < 0.4:
        p1 = rng.uniform(0.75, 0.99)
    elif kind < 0.85:
        p1 = rng.uniform(0.2, 0.75)
    else:
        p1 = rng.uniform(0.03, 0.2)
    p2 = rng.uniform(0.0, min(p1, 1 - p1))
    p3 = rng.uniform(0.0, min(p2, 1 - p1 - p2))
    return list(zip(rng.sample(names, 3), (p1, p2, p3), strict=True))


def _guesses(offered: list[tuple[str, float]]) -> str:
    names = [indefinite(n) for n, _ in offered]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def describe(classes: list[tuple[str, float]], config: LabelBridgeConfig) -> str:
    kind, offered = verdict(classes, config)
    if kind == "sure":
        return f"This looks like a photo of {indefinite(offered[0][0])}."
    if kind == "unsure":
        return f"I can't tell what this is for sure. It might be {_guesses(offered)}."
    return "I can't tell what this is. It looks like a photo, and I can only recognise some objects in photos."


def yes_no(x: str, classes: list[tuple[str, float]], config: LabelBridgeConfig) -> str:
    kind, offered = verdict(classes, config)
    if kind == "sure":
        top = indefinite(offered[0][0])
        return f"Yes, it looks like {top}." if x == offered[0][0] else f"No, it looks like {top}."
    if x in {n for n, _ in offered}:
        return f"Maybe. It might be {indefinite(x)}, but I can't tell for sure."
    return f"I can't tell for sure. It might be {_guesses(offered)}." if offered else "I can't tell."


def detail(classes: list[tuple[str, float]], config: LabelBridgeConfig) -> str:
    answer = "I can't tell that from a photo: I only get a guess of what it shows, not its details."
    kind, offered = verdict(classes, config)
    return answer + (f" It looks like {indefinite(offered[0][0])}." if kind == "sure" else "")


def _turn(classes: list[tuple[str, float]], names: list[str], rng: random.Random,
          config: LabelBridgeConfig) -> tuple[str, str]:
    kind = rng.random()
    if kind < 0.6:
        return typed(rng.choice(WHAT), rng), describe(classes, config)
    if kind < 0.85:
        x = classes[0][0] if rng.random() < 0.5 else rng.choice(names)
        return typed(rng.choice(YES_NO).format(x=indefinite(x)), rng), yes_no(x, classes, config)
    return typed(rng.choice(DETAIL), rng), detail(classes, config)


def build(n: int = 3000, seed: int = 0, config: LabelBridgeConfig | None = None) -> list[dict[str, Any]]:
    """`n` text-only rows in LLaVA format, deterministic in `seed`."""
    config = config or LabelBridgeConfig()
    names = imagenet_class_names()
    rng = random.Random(f"photo-evidence-{seed}")
    rows = []
    for i in range(n):
        classes = sample_classes(names, rng)
        question, answer = _turn(classes, names, rng, config)
        rows.append({"id": f"photo-evidence-{seed}-{i}", "conversations": [
            {"from": "human", "value": f"{evidence_text(classes, config)}\n{question}"},
            {"from": "gpt", "value": answer}]})
    return rows
