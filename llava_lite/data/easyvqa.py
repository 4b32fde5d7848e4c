"""easy-VQA (PyPI `easy-vqa`, MIT) as the sets each training stage needs.

- captions (align): one brief description per image, from the image's shape and colour;
- vqa (adapter): one short-answer row per question; training packs an image's rows with a
  shared prefix, so the image and system prompt are paid for once per image;
- conversations (instruct): dialogues with sentence answers, then a description;
- the official test split is only ever used for evaluation (`eval_items`).
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llava_lite.data.surface import SHORT_ANSWER, ask

CAPTION_PROMPTS = [
    "Describe the image briefly.",
    "What is in this picture?",
    "Give a short description of the image.",
    "Summarize the image in a few words.",
    "Caption this image.",
]
SHAPES = {"circle", "rectangle", "triangle"}
COLORS = {"red", "green", "blue", "yellow", "teal", "brown", "gray", "black"}


def answer_type(answer: str) -> str:
    """easy-VQA's three answer types."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in SHAPES else "color"


def _load(split: str) -> tuple[list[tuple[str, str, int]], dict[int, str]]:
    try:
        import easy_vqa
    except ImportError as err:
        raise RuntimeError("easy-VQA is not installed: pip install --no-deps easy-vqa==1.0") from err
    if split == "train":
        texts, answers, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        texts, answers, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"easy-VQA split {split!r}; use 'train' or 'test'")
    return list(zip(texts, answers, ids, strict=True)), paths


def image_facts(split: str) -> dict[int, dict[str, str]]:
    """Each image's shape and colour, read off the answers to shape and colour questions."""
    return _facts(_load(split)[0])


def _facts(questions: list[tuple[str, str, int]]) -> dict[int, dict[str, str]]:
    facts: dict[int, dict[str, str]] = defaultdict(dict)
    for _q, a, image_id in questions:
        kind = answer_type(a)
        if kind != "yes/no":
            facts[image_id][kind] = a
    return dict(facts)


def _question(q: str) -> str:
    q = q.strip()
    return q[0].upper() + q[1:]


_TARGET = re.compile(r"\b(?:a|an|any|no) ((?:\w+ )?(?:shape|circle|rectangle|triangle))\b")


def _sentence(q: str, a: str, facts: dict[str, str]) -> str:
    """A full-sentence answer, for dialogues and plainly asked questions."""
    kind = answer_type(a)
    if kind == "shape":
        return f"The image shows a {facts.get('color', '')} {a}.".replace("  ", " ")
    if kind == "color":
        return f"The {facts.get('shape', 'shape')} is {a}."
    target = _TARGET.search(q.lower())
    if target is None or is_negated(q):
        return "Yes." if a == "yes" else "No."
    return f"Yes, there is a {target[1]}." if a == "yes" else f"No, there is no {target[1]}."


def is_negated(q: str) -> bool:
    """easy-VQA's negated questions ("is there not a circle?", "is no red shape present?"),
    whose yes/no convention is the dataset's own: they are always asked with the instruction."""
    return bool({"not", "no"} & set(re.findall(r"\w+", q.lower())))


def caption_text(facts: dict[str, str]) -> str:
    return f"A {facts.get('color', 'colored')} {facts.get('shape', 'shape')} on a white background."


def build_captions(split: str = "train", seed: int = 0) -> list[dict[str, Any]]:
    questions, paths = _load(split)
    facts = image_facts(split)
    rng = random.Random(seed)
    rows = []
    for image_id in sorted(facts):
        prompt = rng.choice(CAPTION_PROMPTS)
        rows.append({
            "id": f"easyvqa-{split}-cap-{image_id}",
            "image": paths[image_id],
            "conversations": [
                {"from": "human", "value": f"<image>\n{prompt}"},
                {"from": "gpt", "value": caption_text(facts[image_id])},
            ],
        })
    return rows


def _by_image(questions: list[tuple[str, str, int]]) -> dict[int, list[tuple[str, str]]]:
    grouped: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for q, a, image_id in questions:
        grouped[image_id].append((q, a))
    return grouped


def _short_answer_row(row_id: str, image: str, question: str, answer: str,
                      surface: tuple[random.Random, float, dict[str, str]] | None = None) -> dict[str, Any]:
    """A single-question LLaVA row asked the way evaluation asks (`eval_items`). With `surface`
    (rng, plain share, the image's facts) it is asked in a varied form (`surface.ask`): plainly,
    with a sentence answer, or with the instruction; negated questions keep the instruction."""
    text, reply = f"{SHORT_ANSWER}\n{_question(question)}", answer
    if surface is not None:
        rng, plain, facts = surface
        text, reply = ask(question, answer, _sentence(question, answer, facts), rng,
                          0.0 if is_negated(question) else plain)
    return {"id": row_id, "image": image, "conversations": [
        {"from": "human", "value": f"<image>\n{text}"}, {"from": "gpt", "value": reply}]}


def _surface(facts: dict[int, dict[str, str]], seed: int, plain: float) -> Callable[[int], tuple | None]:
    """Per image, the `surface` argument of `_short_answer_row` (None: the trained form only)."""
    if not plain:
        return lambda image_id: None
    rng = random.Random(seed + 101)
    return lambda image_id: (rng, plain, facts.get(image_id, {}))


def _per_image(split: str, seed: int, rng_offset: int, plain: float):
    """What the per-image builders share, from one read of the annotations: image paths, their
    own rng, each image's facts and the surface variation."""
    questions, paths = _load(split)
    facts = _facts(questions)
    return paths, random.Random(seed + rng_offset), facts, _surface(facts, seed, plain)


def build_vqa(split: str = "train", seed: int = 0, plain: float = 0.0) -> list[dict[str, Any]]:
    """One single-question short-answer row per question (standard LLaVA rows). Training packs
    the rows of an image with a shared prefix (`pack_shared_prefix`), so each question is
    learnt alone, as it is asked at inference, while the image is paid for once. `plain` is
    the share of rows asked plainly, answered in a sentence (`surface`)."""
    questions, paths = _load(split)
    surface = _surface(image_facts(split) if plain else {}, seed, plain)
    rows = []
    for index, (q, a, image_id) in enumerate(questions):
        rows.append(_short_answer_row(f"easyvqa-{split}-q{index}", paths[image_id], q, a, surface(image_id)))
    random.Random(seed).shuffle(rows)
    return rows


POSITIVE_FORMS = ["is there a {}?", "is there a {} in the image?", "does the image contain a {}?", "is a {} present?"]
NEGATIVE_FORMS = ["is there not a {}?", "is there not a {} in the image?", "does the image not contain a {}?",
                  "is no {} present?"]


def build_presence(split: str = "train", seed: int = 0, per_image: int = 4, plain: float = 0.0,
                   pairs: bool = False) -> list[dict[str, Any]]:
    """Yes/no questions about what an image does contain, from its own shape and colour.

    Only 18% of easy-VQA's yes/no questions ask about something present, so a model can score
    82% on them without looking. These rows (plain and negated, in easy-VQA's own phrasings)
    balance that, using training annotations only. `pairs` adds colour-and-shape probes ("is
    there a red circle?"), half of them about the image's own object and half about one that
    differs in colour or in shape, the hard negatives of POPE's adversarial set.
    """
    paths, rng, facts, surface = _per_image(split, seed, 7, plain)
    rows = []
    for image_id, f in sorted(facts.items()):
        targets = ([f"{f['color']} shape"] if "color" in f else []) + ([f["shape"]] if "shape" in f else [])
        for k in range(per_image):
            if not targets:
                break
            target = targets[k % len(targets)]
            negated = rng.random() < 0.5
            q = rng.choice(NEGATIVE_FORMS if negated else POSITIVE_FORMS).format(target)
            rows.append(_short_answer_row(f"easyvqa-{split}-presence-{image_id}-{k}", paths[image_id], q,
                                          "no" if negated else "yes", surface(image_id)))
        if pairs and "color" in f and "shape" in f:
            for k, (target, answer) in enumerate(_pair_probes(f, rng)):
                q = rng.choice(POSITIVE_FORMS).format(target)
                rows.append(_short_answer_row(f"easyvqa-{split}-pair-{image_id}-{k}", paths[image_id], q, answer,
                                              surface(image_id)))
    return rows


def _pair_probes(f: dict[str, str], rng: random.Random) -> list[tuple[str, str]]:
    """The image's own "colour shape" (yes) and one that differs in colour or shape (no)."""
    own = f"{f['color']} {f['shape']}"
    if rng.random() < 0.5:
        other = f"{rng.choice(sorted(COLORS - {f['color']}))} {f['shape']}"
    else:
        other = f"{f['color']} {rng.choice(sorted(SHAPES - {f['shape']}))}"
    return [(own, "yes"), (other, "no")]


COLOR_FORMS = ["what color is the shape?", "what color is the {}?", "what is the color of the {}?",
               "what is the color of the shape?"]


def build_colors(split: str = "train", seed: int = 0, per_image: int = 2, plain: float = 0.0) -> list[dict[str, Any]]:
    """Colour-naming questions for every image whose colour the annotations give, in easy-VQA's
    four phrasings. Only 13% of easy-VQA's questions name a colour, and the colour-driven yes/no
    questions need the same skill; brown (vs red), yellow (vs green) and black (vs blue) were
    the demo model's main errors while a linear probe on the tower separates them."""
    paths, rng, facts, surface = _per_image(split, seed, 11, plain)
    rows = []
    for image_id, f in sorted(facts.items()):
        if "color" not in f:
            continue
        for k, form in enumerate(rng.sample(COLOR_FORMS, min(per_image, len(COLOR_FORMS)))):
            rows.append(_short_answer_row(f"easyvqa-{split}-color-{image_id}-{k}", paths[image_id],
                                          form.format(f.get("shape", "shape")), f["color"], surface(image_id)))
    return rows


def build_conversations(split: str = "train", seed: int = 0, max_turns: int = 4) -> list[dict[str, Any]]:
    """Instruction-style dialogues: questions answered in sentences, then a description.
    Questions come first so they are answered from the image, not from an earlier caption."""
    questions, paths = _load(split)
    facts = image_facts(split)
    rng = random.Random(seed + 1)
    rows = []
    for image_id, qas in sorted(_by_image(questions).items()):
        qas = list(qas)
        rng.shuffle(qas)
        f = facts.get(image_id, {})
        turns = []
        for k, (q, a) in enumerate(qas[:max_turns]):
            text = f"<image>\n{_question(q)}" if k == 0 else _question(q)
            turns += [{"from": "human", "value": text}, {"from": "gpt", "value": _sentence(q, a, f)}]
        if f:
            turns += [{"from": "human", "value": rng.choice(CAPTION_PROMPTS)},
                      {"from": "gpt", "value": caption_text(f)}]
        rows.append({"id": f"easyvqa-{split}-conv-{image_id}", "image": paths[image_id], "conversations": turns})
    return rows


def eval_items(split: str = "test", limit: int | None = None, seed: int = 0) -> list[dict[str, str]]:
    """Single questions for exact-match evaluation: image, question (with the short-answer
    instruction), answer and answer type, and the dataset's own text (`raw`) for the other
    prompt forms (`llava_lite.eval.prompt_forms`). `limit` takes a seeded random sample."""
    questions, paths = _load(split)
    items = [
        {"image": paths[image_id], "question": f"{SHORT_ANSWER}\n{_question(q)}", "answer": a,
         "type": answer_type(a), "raw": q, "instruction": SHORT_ANSWER}
        for q, a, image_id in questions
    ]
    if limit is not None and limit < len(items):
        items = random.Random(seed).sample(items, limit)
    return items


def image_paths(split: str) -> list[str]:
    return [str(Path(p)) for _, p in sorted(_load(split)[1].items())]
