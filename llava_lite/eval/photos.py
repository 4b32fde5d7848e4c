"""Real photos the default model was never trained on, and a scorer for what it says of them.

The photos ship inside common wheels (scikit-image, scikit-learn, matplotlib), so the task
runs offline. Each is labelled with the words that name its subject (`accepted`), whether a
person is in it, and the ImageNet classes that are right for it (`imagenet`), so the task can
report separately on photos whose right class is in the tower head's top 3.

A reply is scored as:
- named: it holds an accepted word or one of the right ImageNet class names;
- abstained: it says it cannot tell;
- invented: it names a person, a geometric shape or a listed object that is not in the photo.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PEOPLE = {"man", "woman", "person", "people", "girl", "boy", "lady", "child", "human", "gentleman", "guy"}
SHAPES = {"circle", "square", "triangle", "rectangle", "geometric"}
# Things a model trained on shapes and scenes may invent; each counts only when the photo
# does not show it (its `accepted` words are never counted).
OBJECTS = {
    "cat", "dog", "bird", "horse", "car", "house", "tree", "flower", "cup", "mug", "rocket", "motorcycle",
    "building", "book", "phone", "computer", "chair", "table", "ball", "boat", "airplane", "plane", "train",
    "clock", "coin", "flag", "moon", "temple", "camera", "fish", "dress", "uniform", "bottle", "food", "cake",
    "hat", "window", "door", "road", "mountain", "river", "beach", "sky", "galaxy", "star", "wall", "grass",
    "eye", "page", "text", "brick", "stone", "gravel",
}
ABSTAIN = re.compile(r"\b(can ?not tell|can't tell|cannot say|can't say|not sure|unsure|i don't know|hard to "
                     r"(say|tell)|unclear|i am not certain|i'm not certain|could be|might be|may be)\b")


@dataclass(frozen=True)
class Photo:
    name: str
    source: str  # "skimage", "sklearn" or "matplotlib"
    file: str
    accepted: frozenset[str]
    imagenet: frozenset[str] = field(default_factory=frozenset)
    person: bool = False


def _p(name: str, source: str, file: str, accepted: str, imagenet: str = "", person: bool = False) -> Photo:
    return Photo(name, source, file, frozenset(accepted.split(",")), frozenset(filter(None, imagenet.split(","))),
                 person)


PHOTOS = [
    _p("astronaut", "skimage", "astronaut.png", "astronaut,spacesuit,space suit,woman,person,flag",
       "space shuttle,suit,military uniform,bulletproof vest", person=True),
    _p("camera", "skimage", "camera.png", "camera,photographer,man,person,tripod,cameraman",
       "tripod,reflex camera,Polaroid camera", person=True),
    _p("chelsea", "skimage", "chelsea.png", "cat,kitten,kitty,tabby",
       "tabby cat,tiger cat,Egyptian Mau,Persian cat,Siamese cat,lynx"),
    _p("coffee", "skimage", "coffee.png", "coffee,cup,mug,espresso,latte,cappuccino,saucer",
       "espresso,cup,coffee mug,eggnog"),
    _p("rocket", "skimage", "rocket.jpg", "rocket,launch,missile,spacecraft,space shuttle",
       "missile,projectile,space shuttle"),
    _p("motorcycle", "skimage", "motorcycle_left.png", "motorcycle,motorbike,bike,moped,scooter",
       "moped,motor scooter,crash helmet,disc brake"),
    _p("horse", "skimage", "horse.png", "horse,pony,silhouette,stallion", "sorrel"),
    _p("hubble", "skimage", "hubble_deep_field.jpg", "galaxy,galaxies,space,stars,star,universe,night sky", ""),
    _p("moon", "skimage", "moon.png", "moon,crater,lunar", ""),
    _p("brick", "skimage", "brick.png", "brick,bricks,wall", "brick wall"),
    _p("grass", "skimage", "grass.png", "grass,lawn,field,hay", "hay"),
    _p("gravel", "skimage", "gravel.png", "gravel,stones,pebbles,rocks,sand", ""),
    _p("coins", "skimage", "coins.png", "coin,coins,money", ""),
    _p("clock", "skimage", "clock_motion.png", "clock", "wall clock,analog clock"),
    _p("page", "skimage", "page.png", "text,page,book,document,writing,letters,words", "book jacket,menu,envelope"),
    _p("china", "sklearn", "china.jpg", "temple,pagoda,palace,building,china,roof,architecture,shrine",
       "palace,bell-cot,dome,monastery,church,stupa,pagoda,boathouse"),
    _p("flower", "sklearn", "flower.jpg", "flower,daisy,petal,petals,blossom,plant", "daisy,bee"),
    _p("grace_hopper", "matplotlib", "grace_hopper.jpg", "woman,person,uniform,officer,lady,navy,military",
       "military uniform,suit,Windsor tie,bow tie", person=True),
]


def photo_path(photo: Photo) -> Path:
    """Where the photo lies in its package; FileNotFoundError names the package to install."""
    try:
        if photo.source == "skimage":
            import skimage

            folder = Path(skimage.__file__).parent / "data"
        elif photo.source == "sklearn":
            import sklearn

            folder = Path(sklearn.__file__).parent / "datasets" / "images"
        else:
            import matplotlib

            folder = Path(matplotlib.get_data_path()) / "sample_data"
    except ImportError as err:
        raise FileNotFoundError(f"photo {photo.name!r} ships with {photo.source}: pip install "
                                f"{'scikit-image' if photo.source == 'skimage' else 'scikit-learn'}") from err
    path = folder / photo.file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: photo {photo.name!r} is missing from this {photo.source} install")
    return path


def _has(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}(s|es)?\b", text) is not None


def score_reply(reply: str, photo: Photo) -> dict[str, Any]:
    """named / abstained / invented for one reply, with the words that made each call."""
    text = reply.lower()
    # the right ImageNet classes name the subject too ("Egyptian Mau", "espresso")
    accepted = {w.lower() for w in photo.accepted | photo.imagenet}
    named = sorted(w for w in accepted if _has(text, w))
    allowed = accepted | (PEOPLE if photo.person else set())
    invented = sorted(w for w in (PEOPLE | SHAPES | OBJECTS) - allowed
                      if _has(text, w) and not any(w in a.split() for a in accepted))
    return {"named": bool(named), "abstained": ABSTAIN.search(text) is not None, "invented": bool(invented),
            "named_words": named, "invented_words": invented}


def summarize_photos(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Shares of replies named / abstained / invented, and of replies that do neither of the
    first two (the ones that fail the task even without inventing)."""
    n = len(rows)
    if not n:
        return {"n": 0}
    count = lambda key: sum(r[key] for r in rows)  # noqa: E731
    silent = sum(not (r["named"] or r["abstained"]) for r in rows)
    return {"named": count("named") / n, "abstained": count("abstained") / n, "invented": count("invented") / n,
            "neither named nor abstained": silent / n, "n": n}
