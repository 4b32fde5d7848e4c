"""The contrastive stage's evaluation: zero-shot accuracy on the held-out Fashion-MNIST
classes beside a supervised linear probe on the same frozen features (the CLIP-vs-supervised
comparison), confusion matrices, and image-text retrieval with recall@K."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llava_lite.dual_encoder import DualEncoder
from llava_lite.images import load_image
from llava_lite.packaged import cache_dir
from llava_lite.retrieval import retrieval_metrics
from llava_lite.train.clip_data import gray_to_rgb, per_class, pooled_features
from llava_lite.train.clip_recipe import ClipRecipe
from llava_lite.zero_shot import DEFAULT_TEMPLATES, class_embeddings


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, num_classes: int,
                 weight_decay: float = 1e-3, steps: int = 200) -> torch.Tensor:
    """Multinomial logistic regression (L-BFGS) on standardised frozen features; returns test
    predictions."""
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    xs, xt = (train_x - mean) / std, (test_x - mean) / std
    layer = torch.nn.Linear(xs.shape[1], num_classes)
    opt = torch.optim.LBFGS(layer.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(xs), train_y) + weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return layer(xt).argmax(-1)


def _confusion(true: Sequence[int], pred: Sequence[int], k: int) -> np.ndarray:
    m = np.zeros((k, k), dtype=int)
    for t, p in zip(true, pred, strict=True):
        m[t, p] += 1
    return m


def plot_confusions(panels: dict[str, np.ndarray], names: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), dpi=100)
    axes = np.atleast_1d(axes)
    for ax, (title, m) in zip(axes, panels.items(), strict=True):
        ax.imshow(m, cmap="Blues")
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > m.max() / 2 else "black", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@torch.no_grad()
def _zero_shot_eval(model: DualEncoder, recipe: ClipRecipe, out: Path, progress: bool) -> dict[str, Any]:
    """Zero-shot on the held-out Fashion-MNIST classes (alone and among all 10) and on seen ones,
    then the supervised baseline beside it, with confusion matrices."""
    from llava_lite.data import fashion_mnist

    root = cache_dir() / "data"
    results: dict[str, Any] = {}
    classes = fashion_mnist.CLASSES
    held = list(recipe.held_out_classes)
    seen = [c for c in classes if c not in held]
    xt, yt = fashion_mnist.load("test", root)
    test_idx = [i for i in range(len(yt)) if classes[yt[i]] in held]
    test_feats = pooled_features(model, "fashion-test-heldout", [f"fm-test-{i}" for i in test_idx],
                                 lambda k: gray_to_rgb(xt[test_idx[k]]), recipe.feature_batch_size, progress)
    emb = model.embed_image_features(test_feats)
    true = [held.index(classes[yt[i]]) for i in test_idx]
    zs = (model.logit_scale() * emb @ class_embeddings(model, held, DEFAULT_TEMPLATES).T).argmax(-1).tolist()
    all10 = (emb @ class_embeddings(model, list(classes), DEFAULT_TEMPLATES).T).argmax(-1).tolist()
    results["zero_shot_heldout_acc"] = float(np.mean([p == t for p, t in zip(zs, true, strict=True)]))
    results["zero_shot_heldout_among_all10_acc"] = float(np.mean(
        [classes[p] == held[t] for p, t in zip(all10, true, strict=True)]))
    seen_idx = per_class(yt, [classes.index(c) for c in seen], 100, recipe.seed)
    seen_feats = pooled_features(model, "fashion-test-seen", [f"fm-test-{i}" for i in seen_idx],
                                 lambda k: gray_to_rgb(xt[seen_idx[k]]), recipe.feature_batch_size, progress)
    seen_pred = (model.embed_image_features(seen_feats) @ class_embeddings(model, seen, DEFAULT_TEMPLATES).T
                 ).argmax(-1).tolist()
    results["zero_shot_seen_acc"] = float(np.mean(
        [seen[p] == classes[yt[i]] for p, i in zip(seen_pred, seen_idx, strict=True)]))
    results["chance_heldout"] = 1 / len(held)
    panels = {f"zero-shot ({results['zero_shot_heldout_acc']:.1%})": _confusion(true, zs, len(held))}
    results |= _probe_eval(model, recipe, held, test_feats, true, panels, progress)
    plot_confusions(panels, held, out / "confusion.png")
    results["held_out_classes"] = held
    results["test_images_heldout"] = len(test_idx)
    return results


def _probe_eval(model: DualEncoder, recipe: ClipRecipe, held: list[str], test_feats: torch.Tensor,
                true: list[int], panels: dict[str, np.ndarray], progress: bool) -> dict[str, float]:
    """The supervised baseline: a linear probe on the same frozen features, trained with labels."""
    from llava_lite.data import fashion_mnist

    classes = fashion_mnist.CLASSES
    xtr, ytr = fashion_mnist.load("train", cache_dir() / "data")
    results = {}
    for shots in recipe.probe_shots:
        n = shots or 1000
        tr_idx = per_class(ytr, [classes.index(c) for c in held], n, recipe.seed)
        tr_feats = pooled_features(model, "fashion-train-heldout", [f"fm-train-{i}" for i in tr_idx],
                                   lambda k, tr_idx=tr_idx: gray_to_rgb(xtr[tr_idx[k]]),
                                   recipe.feature_batch_size, progress)
        tr_y = torch.tensor([held.index(classes[ytr[i]]) for i in tr_idx])
        pred = linear_probe(tr_feats, tr_y, test_feats, len(held)).tolist()
        acc = float(np.mean([p == t for p, t in zip(pred, true, strict=True)]))
        results[f"linear_probe_{n}_per_class_acc"] = acc
        panels[f"linear probe, {n}/class ({acc:.1%})"] = _confusion(true, pred, len(held))
    return results


def _retrieval_eval(model: DualEncoder, recipe: ClipRecipe, progress: bool) -> dict[str, Any]:
    """R@K between easy-VQA test images and their captions (identical captions merged)."""
    from llava_lite.data.easyvqa import caption_text, image_facts, image_paths

    facts, paths = image_facts("test"), image_paths("test")
    ids = sorted(facts)
    feats = pooled_features(model, "easyvqa-test", [paths[i] for i in ids],
                            lambda k: load_image(paths[ids[k]]), recipe.feature_batch_size, progress)
    captions = [caption_text(facts[i]) for i in ids]
    texts = list(dict.fromkeys(captions))
    images_of: list[set[int]] = [set() for _ in texts]
    for i, c in enumerate(captions):
        images_of[texts.index(c)].add(i)
    r = retrieval_metrics(model.embed_image_features(feats), model.encode_texts(texts), text_image=images_of)
    return {**r, "images": len(ids), "distinct_captions": len(texts)}


def evaluate(model: DualEncoder, recipe: ClipRecipe, out: Path, progress: bool = True) -> dict[str, Any]:
    """The recipe's evaluation, written to eval.json and eval.md (and confusion.png)."""
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    if recipe.eval_zero_shot and recipe.held_out_classes:
        results |= _zero_shot_eval(model, recipe, out, progress)
    if recipe.retrieval_set == "easyvqa-test":
        results["retrieval_easyvqa_test"] = _retrieval_eval(model, recipe, progress)
    (out / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| measure | value |", "|---|---|"]
    for k, v in results.items():
        if isinstance(v, dict):
            lines += [f"| {k}.{kk} | {vv:.4f} |" if isinstance(vv, float) else f"| {k}.{kk} | {vv} |"
                      for kk, vv in v.items()]
        else:
            lines.append(f"| {k} | {v:.2%} |" if isinstance(v, float) else f"| {k} | {v} |")
    (out / "eval.md").write_text("\n".join(lines) + "\n")
    return results
