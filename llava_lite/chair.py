"""CHAIR caption-hallucination scores (Rohrbach et al., 2018, "Object Hallucination in Image
Captioning"), for images whose objects are known.

- CHAIR-i: the share of object mentions that name nothing in the image;
- CHAIR-s: the share of captions with at least one such mention;
- recall: the share of the image's objects that some mention names.

A mention is an object word (plural or a listed synonym too) with the colour word just before
it, if any ("two small red circles" -> red circle). It is hallucinated when no object in the
image has that shape, and that colour when one is given. Counts and positions are not checked.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# words that may stand between a colour and its object without breaking the mention
MODIFIERS = {"small", "large", "big", "little", "tiny", "dark", "light", "bright", "solid"}


@dataclass(frozen=True)
class Mention:
    shape: str
    color: str | None


def _canonical(word: str, objects: Mapping[str, str]) -> str | None:
    if word in objects:
        return objects[word]
    if word.endswith("s") and word[:-1] in objects:  # plurals: circles, squares
        return objects[word[:-1]]
    return None


def mentions(caption: str, objects: Mapping[str, str], colors: set[str]) -> list[Mention]:
    """Object mentions in `caption`. `objects` maps each object word (and synonym) to its
    canonical name, e.g. {"circle": "circle", "rectangle": "square", ...}."""
    found: list[Mention] = []
    color: str | None = None
    for word in re.findall(r"[a-z]+", caption.lower()):
        shape = _canonical(word, objects)
        if shape is not None:
            found.append(Mention(shape, color))
            color = None
        elif word in colors:
            color = word
        elif word not in MODIFIERS:
            color = None
    return found


def _names(m: Mention, obj: tuple[str, str]) -> bool:
    color, shape = obj
    return m.shape == shape and m.color in (None, color)


def chair_scores(captions: Sequence[str], scene_objects: Sequence[Sequence[tuple[str, str]]],
                 objects: Mapping[str, str], colors: set[str]) -> dict[str, float]:
    """CHAIR-i, CHAIR-s and object recall over captions and their images' (colour, shape) objects."""
    if len(captions) != len(scene_objects):
        raise ValueError(f"{len(captions)} captions for {len(scene_objects)} images")
    n_mentions = n_hallucinated = n_bad_captions = n_objects = n_recalled = 0
    for caption, present in zip(captions, scene_objects, strict=True):
        found = mentions(caption, objects, colors)
        bad = [m for m in found if not any(_names(m, o) for o in present)]
        n_mentions += len(found)
        n_hallucinated += len(bad)
        n_bad_captions += bool(bad)
        n_objects += len(present)
        n_recalled += sum(any(_names(m, o) for m in found) for o in present)
    return {"CHAIR-i": n_hallucinated / n_mentions if n_mentions else 0.0,
            "CHAIR-s": n_bad_captions / len(captions) if captions else 0.0,
            "recall": n_recalled / n_objects if n_objects else 0.0,
            "mentions": float(n_mentions), "hallucinated": float(n_hallucinated)}
