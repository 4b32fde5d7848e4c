"""Zero-shot against a supervised linear probe on the same frozen features, the founding
experiment of CLIP reproduced offline: the label-space bridge (no training) on Fashion-MNIST
(10-way, the full 10,000-image test set) and scikit-learn's digits (the MNIST stand-in).

    python -m llava_lite.eval.zero_shot_table --out runs/zero_shot_table

Writes result.json and result.md. A dual encoder folder (`--dual-encoder`, e.g. a trained
`clip-demo`) is scored on the same sets beside it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def fashion_mnist(n_train: int) -> dict[str, Any]:
    from llava_lite.data import fashion_mnist
    from llava_lite.packaged import cache_dir

    root = cache_dir() / "data"
    train_x, train_y = fashion_mnist.load("train", root)
    test_x, test_y = fashion_mnist.load("test", root)
    pick = np.random.default_rng(0).permutation(len(train_x))[:n_train]
    return {"name": "Fashion-MNIST", "classes": list(fashion_mnist.CLASSES), "train": (train_x[pick], train_y[pick]),
            "test": (test_x, test_y), "template": "a photo of a {}."}


def digits() -> dict[str, Any]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images * (255 / 16)).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(images))
    half = len(order) // 2
    return {"name": "digits (scikit-learn)", "classes": [f"the number {d}" for d in DIGIT_NAMES],
            "train": (images[order[:half]], data.target[order[:half]]),
            "test": (images[order[half:]], data.target[order[half:]]), "template": "a photo of {}."}


def _rgb(arrays: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(a).convert("RGB") for a in arrays]


@torch.no_grad()
def tower_outputs(bridge, arrays: np.ndarray, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled head features, class probabilities) of grayscale arrays through the bridge's tower."""
    feats, probs = [], []
    for start in tqdm(range(0, len(arrays), batch_size), desc="tower", unit="batch", leave=False):
        out = bridge.tower(bridge.tower.preprocess(_rgb(arrays[start:start + batch_size])))
        feats.append(out[:, -bridge.tower.grid**2:].float().mean(1))
        probs.append(bridge.tower.class_probs(out))
    return torch.cat(feats), torch.cat(probs)


def score_set(bridge, data: dict[str, Any], dual=None) -> dict[str, float]:
    import torch.nn.functional as F

    from llava_lite.train.clip_eval import linear_probe
    from llava_lite.zero_shot import class_embeddings, zero_shot_classify

    (train_x, train_y), (test_x, test_y) = data["train"], data["test"]
    train_f, _ = tower_outputs(bridge, train_x)
    test_f, test_p = tower_outputs(bridge, test_x)
    classes = class_embeddings(bridge, data["classes"], [data["template"]])
    zero = (F.normalize(bridge.embed_probs(test_p), dim=-1) @ classes.T).argmax(-1).numpy()
    probe = linear_probe(train_f, torch.as_tensor(train_y), test_f, len(data["classes"])).numpy()
    row = {"label-space zero-shot (no training)": float((zero == test_y).mean()),
           "linear probe": float((probe == test_y).mean()), "chance": 1 / len(data["classes"]),
           "n_probe_train": float(len(train_y)), "n_test": float(len(test_y))}
    if dual is not None:
        pred = zero_shot_classify(dual, _rgb(test_x), data["classes"], [data["template"]]).indices.numpy()
        row["dual encoder zero-shot"] = float((pred == test_y).mean())
    return row


def _cell(value: float | None, column: str) -> str:
    if value is None:
        return ""
    return f"{int(value)}" if column.startswith("n_") else f"{value:.2%}"


def main(argv: Sequence[str] | None = None) -> int:
    from llava_lite.dual_encoder import load_dual_encoder
    from llava_lite.label_space import LabelSpaceEncoder

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/zero_shot_table"), help="report folder")
    p.add_argument("--probe-train", type=int, default=5000, help="Fashion-MNIST images the probe trains on")
    p.add_argument("--dual-encoder", default=None, help="also score this dual encoder folder")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    bridge = LabelSpaceEncoder()
    dual = load_dual_encoder(args.dual_encoder) if args.dual_encoder else None
    table = {d["name"]: score_set(bridge, d, dual) for d in (digits(), fashion_mnist(args.probe_train))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(table, indent=2) + "\n")
    md = markdown_table(table)
    (args.out / "result.md").write_text(md)
    print(md, end="")
    return 0


def markdown_table(table: dict[str, dict[str, float]]) -> str:
    """One row per set, one column per measure (counts as integers, the rest as percentages)."""
    cols = list(dict.fromkeys(k for row in table.values() for k in row))
    lines = ["| set | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {name} | " + " | ".join(_cell(row.get(c), c) for c in cols) + " |" for name, row in table.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
