"""The contrastive stage's training pairs: captioned images from named LLaVA caption builders
(their assistant turn is the caption) and Fashion-MNIST class captions, with the locked
tower's pooled features computed once per image and cached on disk."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from llava_lite.feature_cache import tower_key
from llava_lite.images import load_image
from llava_lite.packaged import cache_dir

ImageSource = Callable[[int], Image.Image]
Caption = Callable[[random.Random], str]


def pooled_features(model, name: str, ids: Sequence[str], load: ImageSource, batch_size: int = 64,
                    progress: bool = True) -> torch.Tensor:
    """(N, H) mean-pooled tower features for N images, cached by tower and image ids."""
    from safetensors.torch import load_file, save_file

    digest = hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]
    path = cache_dir() / "clip-features" / tower_key(model.config.vision) / f"{name}-{len(ids)}-{digest}.safetensors"
    if path.is_file():
        return load_file(str(path))["features"].float()
    chunks = []
    for start in tqdm(range(0, len(ids), batch_size), desc=f"features {name}", unit="batch", disable=not progress):
        pil = [load(i) for i in range(start, min(start + batch_size, len(ids)))]
        chunks.append(model.image_features(model.tower.preprocess(pil)).half())
    feats = torch.cat(chunks)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"features": feats.contiguous()}, str(tmp))
    tmp.replace(path)
    return feats.float()


def gray_to_rgb(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr).convert("RGB")


def per_class(labels: np.ndarray, classes: Sequence[int], n: int, seed: int) -> list[int]:
    """Up to `n` indices of each class in `classes`, drawn by `seed`, sorted within a class."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        out += sorted(rng.choice(members, size=min(n, len(members)), replace=False).tolist())
    return out


@dataclass
class PairSet:
    """Training pairs: an image loader per row (and, with a locked tower, its cached pooled
    features), a caption maker, and a positive group (rows of one group are all positives)."""

    images: list[Callable[[], Image.Image]] = field(default_factory=list)
    captions: list[Caption] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    features: list[torch.Tensor] = field(default_factory=list)

    def add(self, load: ImageSource, count: int, captions: list[Caption], groups: list[str],
            feats: torch.Tensor | None) -> None:
        self.images += [lambda i=i: load(i) for i in range(count)]
        self.captions += captions
        self.groups += groups
        if feats is not None:
            self.features.append(feats)

    def __len__(self) -> int:
        return len(self.captions)

    def feature_tensor(self) -> torch.Tensor | None:
        return torch.cat(self.features) if self.features else None


def build_pairs(model, recipe, progress: bool) -> tuple[PairSet, dict[str, int]]:
    """Every training pair of a `ClipRecipe`, with per-source counts. Features are cached only
    for a locked tower: an unlocked one is run inside each step."""
    from llava_lite.data.builders import build_train_set

    root = cache_dir() / "data"
    locked = model.config.lock_image
    pairs, counts = PairSet(), {}
    for spec in recipe.caption_sets:
        rows = json.loads(build_train_set(spec["name"], root, **spec.get("args", {})).read_text())
        images = [r["image"] for r in rows]
        caps = [next(t["value"] for t in r["conversations"] if t["from"] == "gpt") for r in rows]
        load = lambda i, images=images: load_image(images[i])  # noqa: E731
        feats = pooled_features(model, spec["name"], images, load, recipe.feature_batch_size,
                                progress) if locked else None
        pairs.add(load, len(rows), [lambda rng, c=c: c for c in caps], [f"caption:{c}" for c in caps], feats)
        counts[spec["name"]] = len(rows)
    if recipe.fashion_per_class:
        counts["fashion-mnist"] = _add_fashion(pairs, model, recipe, locked, progress)
    return pairs, counts


def _add_fashion(pairs: PairSet, model, recipe, locked: bool, progress: bool) -> int:
    from llava_lite.data import fashion_mnist

    x, y = fashion_mnist.load("train", cache_dir() / "data")
    seen = [c for c in fashion_mnist.CLASSES if c not in recipe.held_out_classes]
    idx = per_class(y, [fashion_mnist.CLASSES.index(c) for c in seen], recipe.fashion_per_class, recipe.seed)
    load = lambda k: gray_to_rgb(x[idx[k]])  # noqa: E731
    feats = pooled_features(model, "fashion-train", [f"fm-train-{i}" for i in idx], load,
                            recipe.feature_batch_size, progress) if locked else None
    templates = recipe.caption_templates
    names = [fashion_mnist.CLASSES[y[i]] for i in idx]
    pairs.add(load, len(idx), [lambda rng, n=n: rng.choice(templates).format(n) for n in names],
              [f"class:{n}" for n in names], feats)
    return len(idx)
