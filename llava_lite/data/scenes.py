"""A procedural scene generator: several shapes per image, deterministic by seed.

It teaches what easy-VQA lacks: counting, several objects with colours and sizes, and
spatial relations, as captions, short-answer QA and multi-turn dialogues. The `test` split
draws from a different seed stream than `train`, so it is held out by construction.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from llava_lite.data.surface import ask

COLORS = {
    "red": (220, 30, 30), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 30),
    "teal": (30, 160, 160), "brown": (130, 80, 30), "gray": (128, 128, 128), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
# words a caption may use for each shape (CHAIR scoring): a square is also a rectangle
OBJECT_WORDS = {"circle": "circle", "square": "square", "rectangle": "square", "triangle": "triangle"}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
CANVAS = 128
CELL = CANVAS // 2  # objects sit in the cells of a 2x2 grid, so relations are unambiguous
SPLIT_OFFSETS = {"train": 0, "test": 1_000_003}


@dataclass
class SceneObject:
    shape: str
    color: str
    size: str  # "small" | "large"
    col: int  # 0 left, 1 right
    row: int  # 0 top, 1 bottom

    @property
    def name(self) -> str:
        return f"{self.size} {self.color} {self.shape}"

    @property
    def where(self) -> str:
        return f"{('top', 'bottom')[self.row]} {('left', 'right')[self.col]}"


def make_scene(rng: random.Random) -> list[SceneObject]:
    count = rng.randint(1, 4)
    cells = rng.sample([(c, r) for r in range(2) for c in range(2)], count)
    return [SceneObject(rng.choice(SHAPES), rng.choice(sorted(COLORS)), rng.choice(("small", "large")), c, r)
            for c, r in cells]


def render(objects: list[SceneObject], rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (CANVAS, CANVAS), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for obj in objects:
        half = rng.randint(20, 26) if obj.size == "large" else rng.randint(9, 13)
        cx = obj.col * CELL + CELL // 2 + rng.randint(-3, 3)
        cy = obj.row * CELL + CELL // 2 + rng.randint(-3, 3)
        box = (cx - half, cy - half, cx + half, cy + half)
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    return img


def _count_phrase(n: int) -> str:
    return f"{NUMBER_WORDS[n]} shape" + ("s" if n > 1 else "")


def caption(objects: list[SceneObject]) -> str:
    parts = [f"a {o.name} at the {o.where}" for o in sorted(objects, key=lambda o: (o.row, o.col))]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{_count_phrase(len(objects)).capitalize()}: {listed}."


def questions(objects: list[SceneObject], rng: random.Random) -> list[tuple[str, str, str]]:
    """(question, short answer, sentence answer) triples, each answerable from the scene."""
    qa: list[tuple[str, str, str]] = []
    n = len(objects)
    qa.append(("How many shapes are there?", str(n), f"There {'is' if n == 1 else 'are'} {_count_phrase(n)}."))
    color = rng.choice(sorted(COLORS))
    k = sum(o.color == color for o in objects)
    qa.append((f"How many {color} shapes are there?", str(k),
               f"There {'is' if k == 1 else 'are'} {NUMBER_WORDS.get(k, 'no')} {color} shape{'s' * (k != 1)}."))
    for obj in objects:
        same_shape = [o for o in objects if o.shape == obj.shape]
        if len(same_shape) == 1:
            qa.append((f"What color is the {obj.shape}?", obj.color, f"The {obj.shape} is {obj.color}."))
            qa.append((f"Where is the {obj.shape}?", obj.where, f"The {obj.shape} is at the {obj.where}."))
        qa.append((f"What shape is at the {obj.where}?", obj.shape, f"There is a {obj.name} at the {obj.where}."))
    # Half the presence questions ask about an object that is there, so "no" is not a free win.
    if rng.random() < 0.5:
        pick = rng.choice(objects)
        shape, color = pick.shape, pick.color
    else:
        shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
    present = any(o.shape == shape and o.color == color for o in objects)
    qa.append((f"Is there a {color} {shape}?", "yes" if present else "no",
               f"{'Yes' if present else 'No'}, there is {'a' if present else 'no'} {color} {shape}."))
    if n >= 2:
        a, b = rng.sample(objects, 2)
        if a.col != b.col:
            qa.append(_relation(a, b, "to the left of", "to the right of", a.col < b.col))
        if a.row != b.row:
            qa.append(_relation(a, b, "above", "below", a.row < b.row))
    return qa


def _relation(a: SceneObject, b: SceneObject, relation: str, opposite: str, holds: bool) -> tuple[str, str, str]:
    """"Is the <a> <relation> the <b>?" with its short and sentence answers."""
    first, second = f"{a.color} {a.shape}", f"{b.color} {b.shape}"
    return (f"Is the {first} {relation} the {second}?", "yes" if holds else "no",
            f"{'Yes' if holds else 'No'}, the {first} is {relation if holds else opposite} the {second}.")


def question_type(question: str) -> str:
    if question.startswith("How many"):
        return "count"
    if question.startswith(("Is the", "Where")):
        return "spatial"
    if question.startswith("What color"):
        return "color"
    if question.startswith("What shape"):
        return "shape"
    return "yes/no"


def generate(split: str, n: int, out_dir: str | Path, seed: int = 0) -> list[dict[str, Any]]:
    """Render `n` scenes of `split` (PNG files under out_dir) and return their annotations."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"scene split {split!r}; use one of {sorted(SPLIT_OFFSETS)}")
    out = Path(out_dir) / f"{split}-{seed}"
    out.mkdir(parents=True, exist_ok=True)
    scenes = []
    for i in range(n):
        rng = random.Random(seed * 7_919 + SPLIT_OFFSETS[split] + i)
        objects = make_scene(rng)
        path = out / f"{i:05d}.png"
        if not path.is_file():
            tmp = path.with_name(f".{path.name}.tmp")
            render(objects, rng).save(tmp, format="PNG")
            tmp.replace(path)
        else:
            render(objects, rng)  # keep the rng stream identical whether or not the file exists
        scenes.append({"id": f"scene-{split}-{seed}-{i}", "image": str(path),
                       "objects": [asdict(o) for o in objects], "qa": questions(objects, rng)})
    return scenes


def scene_objects(scene: dict[str, Any]) -> list[SceneObject]:
    """The objects of a generated scene row."""
    return [SceneObject(**o) for o in scene["objects"]]


def to_captions(scenes: list[dict[str, Any]], prompts: list[str]) -> list[dict[str, Any]]:
    return [{"id": s["id"] + "-cap", "image": s["image"], "conversations": [
        {"from": "human", "value": f"<image>\n{prompts[i % len(prompts)]}"},
        {"from": "gpt", "value": caption(scene_objects(s))}]} for i, s in enumerate(scenes)]


def presence_probes(objects: list[SceneObject], rng: random.Random, k: int) -> list[tuple[str, str, str]]:
    """`k` "Is there a <colour> <shape>?" questions about objects that are there and `k` about
    ones that are not, half of those differing from a present object only in colour or shape
    (POPE's adversarial negatives), as (question, short answer, sentence) triples."""
    present = {(o.color, o.shape) for o in objects}
    absent = [(c, s) for c in sorted(COLORS) for s in SHAPES if (c, s) not in present]
    near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
    probes = []
    for i in range(k):
        color, shape = rng.choice(sorted(present))
        probes.append((f"Is there a {color} {shape}?", "yes", f"Yes, there is a {color} {shape}."))
        color, shape = rng.choice(near if near and i % 2 == 0 else absent)
        probes.append((f"Is there a {color} {shape}?", "no", f"No, there is no {color} {shape}."))
    return probes


def to_vqa(scenes: list[dict[str, Any]], instruction: str, plain: float = 0.0, presence: int = 0,
           seed: int = 0) -> list[dict[str, Any]]:
    """One single-question row per question. `presence` adds that many present and absent
    object probes per scene; `plain` is the share of questions asked plainly and answered in a
    sentence (`surface.ask`), the rest with `instruction` and a one-word answer."""
    rng = random.Random(seed + 13)
    rows = []
    for s in scenes:
        qa = list(s["qa"]) + presence_probes(scene_objects(s), rng, presence)
        for k, (q, short, sentence) in enumerate(qa):
            text, reply = (ask(q, short, sentence, rng, plain, instruction=instruction) if plain
                           else (f"{instruction}\n{q}", short))
            rows.append({"id": f"{s['id']}-q{k}", "image": s["image"], "conversations": [
                {"from": "human", "value": f"<image>\n{text}"}, {"from": "gpt", "value": reply}]})
    return rows


def to_dialogues(scenes: list[dict[str, Any]], prompts: list[str], max_turns: int = 4) -> list[dict[str, Any]]:
    """Questions answered in sentences, then a description of the whole scene."""
    rows = []
    for i, s in enumerate(scenes):
        turns = []
        for k, (q, _short, sentence) in enumerate(s["qa"][:max_turns]):
            turns += [{"from": "human", "value": f"<image>\n{q}" if k == 0 else q},
                      {"from": "gpt", "value": sentence}]
        turns += [{"from": "human", "value": prompts[i % len(prompts)]},
                  {"from": "gpt", "value": caption(scene_objects(s))}]
        rows.append({"id": s["id"] + "-dlg", "image": s["image"], "conversations": turns})
    return rows


def eval_items(scenes: list[dict[str, Any]], instruction: str) -> list[dict[str, str]]:
    """Single questions with their short answers; `raw` and `instruction` give the other prompt
    forms (`llava_lite.eval.prompt_forms`)."""
    return [{"image": s["image"], "question": f"{instruction}\n{q}", "answer": short, "type": question_type(q),
             "raw": q, "instruction": instruction}
            for s in scenes for q, short, _ in s["qa"]]
