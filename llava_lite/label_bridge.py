"""The label-space bridge: a photo reaches the LLM as what the tower's classifier head saw.

The default model's projector was trained on drawn shapes only, so its patch tokens for a
real photo mean nothing to the LLM (it described a cat as "a woman named Sarah"). The
tower itself did see real photos: its ImageNet head often names them. For an image that the
domain gate (`llava_lite.domain_gate`) puts outside the training images, the image
placeholder is replaced by a short text holding the head's best guesses and how sure it is,
in the LLM's own tokens (the zero-shot transfer through a label space of ConSE, Norouzi et
al. 2014, read as text as in LENS, Berrios et al. 2023). The LLM learns, from sampled label
distributions with no photos at all (`llava_lite.data.photo_evidence`), to name what the
head is sure of and to say it cannot tell otherwise.

How sure the evidence says the head is follows one rule, here, so training rows and
inference agree.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llava_lite.config import LabelBridgeConfig


@dataclass(frozen=True)
class ImageEvidence:
    """What the tower says of one image: its head's top classes, and whether the domain
    gate put it outside the training images (`outside`, with its score and threshold)."""

    classes: list[tuple[str, float]] = field(default_factory=list)
    outside: bool = False
    score: float = 0.0
    threshold: float = 0.0


def candidates(classes: Sequence[tuple[str, float]], config: LabelBridgeConfig) -> list[tuple[str, float]]:
    """The guesses worth offering: at most `max_candidates`, each at least `candidate_floor`."""
    ranked = sorted(classes, key=lambda c: -c[1])
    return [c for c in ranked if c[1] >= config.candidate_floor][: config.max_candidates]


def verdict(classes: Sequence[tuple[str, float]], config: LabelBridgeConfig) -> tuple[str, list[tuple[str, float]]]:
    """The rule: ("sure", [top class]) from `confident` on, else ("unsure", guesses) when a
    guess clears `candidate_floor`, else ("lost", [])."""
    offered = candidates(classes, config)
    if offered and offered[0][1] >= config.confident:
        return "sure", offered[:1]
    return ("unsure", offered) if offered else ("lost", [])


def evidence_text(classes: Sequence[tuple[str, float]], config: LabelBridgeConfig) -> str:
    """The text that stands in for a photo, e.g.
    "[a photo; the image classifier is sure it shows: tripod (95%)]"."""
    kind, offered = verdict(classes, config)
    return {"sure": f"[a photo; the image classifier is sure it shows: {_listed(offered)}]",
            "unsure": f"[a photo; the image classifier is unsure; its best guesses: {_listed(offered)}]",
            "lost": "[a photo; the image classifier does not recognise it]"}[kind]


def _listed(classes: Sequence[tuple[str, float]]) -> str:
    return ", ".join(f"{name} ({round(100 * p)}%)" for name, p in classes)


def bridged_messages(messages: Sequence[dict[str, Any]], texts: Sequence[str | None],
                     image_token: str) -> list[dict[str, Any]]:
    """`messages` with the i-th image placeholder replaced by `texts[i]` where that is not
    None. Placeholders are counted in order over string contents and image content parts."""
    counter = iter(range(len(texts)))
    out = []
    for msg in messages:
        content = msg.get("content", msg.get("value"))
        key = "content" if "content" in msg else "value"
        if isinstance(content, str):
            pieces = content.split(image_token)
            text = pieces[0]
            for piece in pieces[1:]:
                replacement = texts[next(counter)]
                text += (image_token if replacement is None else replacement) + piece
            out.append({**msg, key: text})
        elif isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image":
                    replacement = texts[next(counter)]
                    part = part if replacement is None else {"type": "text", "text": replacement}
                parts.append(part)
            out.append({**msg, key: parts})
        else:
            out.append(msg)
    return out


def indefinite(name: str) -> str:
    """"a tripod", "an espresso"."""
    return f"{'an' if re.match(r'[aeiouAEIOU]', name) else 'a'} {name}"
