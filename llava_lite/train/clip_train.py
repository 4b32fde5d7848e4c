"""Train and evaluate a dual encoder from a `ClipRecipe`.

With a locked image tower (LiT) the tower's pooled features are computed once per image and
cached on disk; training then runs only the text encoder and the heads. At the end: zero-shot
accuracy on the held-out Fashion-MNIST classes, a supervised linear probe on the same frozen
features (the CLIP-vs-supervised comparison), confusion matrices, and image-text retrieval.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from llava_lite.dual_encoder import DualEncoder
from llava_lite.feature_cache import tower_key
from llava_lite.images import load_image
from llava_lite.packaged import cache_dir
from llava_lite.retrieval import retrieval_metrics
from llava_lite.train.clip_recipe import ClipRecipe
from llava_lite.train.plots import plot_loss
from llava_lite.zero_shot import DEFAULT_TEMPLATES, class_embeddings

ImageSource = Callable[[int], Image.Image]


# -- pooled tower features, cached -------------------------------------------------------------
def pooled_features(model: DualEncoder, name: str, ids: Sequence[str], load: ImageSource,
                    batch_size: int = 64, progress: bool = True) -> torch.Tensor:
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


def _gray_to_rgb(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr).convert("RGB")


# -- data ------------------------------------------------------------------------------------
class PairSet:
    """Training pairs: pooled image features, a caption maker and a positive-group per row."""

    def __init__(self) -> None:
        self.features: list[torch.Tensor] = []
        self.captions: list[Callable[[random.Random], str]] = []
        self.groups: list[str] = []

    def add(self, feats: torch.Tensor, captions: list[Callable[[random.Random], str]], groups: list[str]) -> None:
        self.features.append(feats)
        self.captions += captions
        self.groups += groups

    def tensor(self) -> torch.Tensor:
        return torch.cat(self.features)


def build_pairs(model: DualEncoder, recipe: ClipRecipe, progress: bool) -> tuple[PairSet, dict[str, int]]:
    from llava_lite.data import fashion_mnist
    from llava_lite.data.builders import build_train_set

    root = cache_dir() / "data"
    pairs, counts = PairSet(), {}
    for spec in recipe.caption_sets:
        rows = json.loads(build_train_set(spec["name"], root, **spec.get("args", {})).read_text())
        images = [r["image"] for r in rows]
        caps = [next(t["value"] for t in r["conversations"] if t["from"] == "gpt") for r in rows]
        feats = pooled_features(model, spec["name"], images, lambda i, images=images: load_image(images[i]),
                                recipe.feature_batch_size, progress)
        pairs.add(feats, [lambda rng, c=c: c for c in caps], [f"caption:{c}" for c in caps])
        counts[spec["name"]] = len(rows)
    if recipe.fashion_per_class:
        x, y = fashion_mnist.load("train", root)
        seen = [c for c in fashion_mnist.CLASSES if c not in recipe.held_out_classes]
        idx = _per_class(y, [fashion_mnist.CLASSES.index(c) for c in seen], recipe.fashion_per_class, recipe.seed)
        feats = pooled_features(model, "fashion-train", [f"fm-train-{i}" for i in idx],
                                lambda k: _gray_to_rgb(x[idx[k]]), recipe.feature_batch_size, progress)
        templates = recipe.caption_templates
        names = [fashion_mnist.CLASSES[y[i]] for i in idx]
        pairs.add(feats, [lambda rng, n=n: rng.choice(templates).format(n) for n in names],
                  [f"class:{n}" for n in names])
        counts["fashion-mnist"] = len(idx)
    return pairs, counts


def _per_class(labels: np.ndarray, classes: Sequence[int], n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        out += sorted(rng.choice(members, size=min(n, len(members)), replace=False).tolist())
    return out


# -- training ----------------------------------------------------------------------------------
def train(model: DualEncoder, recipe: ClipRecipe, pairs: PairSet, out: Path, progress: bool = True) -> dict[str, Any]:
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    feats = pairs.tensor()
    n = len(feats)
    heads = [*model.image_head.parameters(), *model.text_head.parameters(), *model.logit_scale.parameters()]
    groups = [{"params": heads, "lr": recipe.lr, "weight_decay": 0.0}]
    text_params = [p for p in model.text_model.parameters() if p.requires_grad]
    if text_params:
        groups.append({"params": text_params, "lr": recipe.text_lr, "weight_decay": recipe.weight_decay})
    if not model.config.lock_image:
        groups.append({"params": [p for p in model.tower.parameters() if p.requires_grad], "lr": recipe.text_lr})
    optimizer = torch.optim.AdamW(groups)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(recipe.warmup_ratio * recipe.steps), recipe.steps)
    model.train()
    model.tower.train(False)
    metrics_path = out / "metrics.jsonl"
    order: list[int] = []
    start = time.perf_counter()
    with open(metrics_path, "w") as log, tqdm(total=recipe.steps, desc="clip", unit="step",
                                              disable=not progress) as bar:
        for step in range(1, recipe.steps + 1):
            if len(order) < recipe.batch_size:
                order += rng.sample(range(n), n)
            batch, order = order[:recipe.batch_size], order[recipe.batch_size:]
            captions = [pairs.captions[i](rng) for i in batch]
            ids = {g: k for k, g in enumerate(dict.fromkeys(pairs.groups[i] for i in batch))}
            labels = torch.tensor([ids[pairs.groups[i]] for i in batch])
            loss = model.loss(feats[batch], captions, labels=labels, hard_negatives=recipe.hard_negatives)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"step {step}: loss is {loss.item()}; stopping")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            optimizer.step()
            scheduler.step()
            row = {"step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                   "logit_scale": model.logit_scale().item(),
                   "samples_per_s": step * recipe.batch_size / (time.perf_counter() - start)}
            log.write(json.dumps(row) + "\n")
            log.flush()  # a crash keeps every logged step
            bar.set_postfix(loss=f"{row['loss']:.3f}", scale=f"{row['logit_scale']:.1f}")
            bar.update()
    model.eval()
    plot_loss(metrics_path, out / "loss.png", f"{recipe.name}: contrastive loss")
    return {"train_seconds": round(time.perf_counter() - start, 1), "steps": recipe.steps, "pairs": n,
            "final_loss": row["loss"], "logit_scale": row["logit_scale"]}


# -- evaluation ----------------------------------------------------------------------------------
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
                                 lambda k: _gray_to_rgb(xt[test_idx[k]]), recipe.feature_batch_size, progress)
    emb = model.embed_image_features(test_feats)
    true = [held.index(classes[yt[i]]) for i in test_idx]
    zs = (model.logit_scale() * emb @ class_embeddings(model, held, DEFAULT_TEMPLATES).T).argmax(-1).tolist()
    all10 = (emb @ class_embeddings(model, list(classes), DEFAULT_TEMPLATES).T).argmax(-1).tolist()
    results["zero_shot_heldout_acc"] = float(np.mean([p == t for p, t in zip(zs, true, strict=True)]))
    results["zero_shot_heldout_among_all10_acc"] = float(np.mean(
        [classes[p] == held[t] for p, t in zip(all10, true, strict=True)]))
    seen_idx = _per_class(yt, [classes.index(c) for c in seen], 100, recipe.seed)
    seen_feats = pooled_features(model, "fashion-test-seen", [f"fm-test-{i}" for i in seen_idx],
                                 lambda k: _gray_to_rgb(xt[seen_idx[k]]), recipe.feature_batch_size, progress)
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
        per_class = shots or 1000
        tr_idx = _per_class(ytr, [classes.index(c) for c in held], per_class, recipe.seed)
        tr_feats = pooled_features(model, "fashion-train-heldout", [f"fm-train-{i}" for i in tr_idx],
                                   lambda k, tr_idx=tr_idx: _gray_to_rgb(xtr[tr_idx[k]]),
                                   recipe.feature_batch_size, progress)
        tr_y = torch.tensor([held.index(classes[ytr[i]]) for i in tr_idx])
        pred = linear_probe(tr_feats, tr_y, test_feats, len(held)).tolist()
        acc = float(np.mean([p == t for p, t in zip(pred, true, strict=True)]))
        results[f"linear_probe_{per_class}_per_class_acc"] = acc
        panels[f"linear probe, {per_class}/class ({acc:.1%})"] = _confusion(true, pred, len(held))
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


def run_clip_recipe(recipe: ClipRecipe, output: Path, recipe_file: Path | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Train, save (OUTPUT/model), evaluate (OUTPUT/eval); returns the summary."""
    import shutil

    output.mkdir(parents=True, exist_ok=True)
    (output / "recipe.json").write_text(recipe.to_json())
    if recipe_file is not None:
        shutil.copyfile(recipe_file, output / f"recipe-{recipe.name}.py")
    torch.manual_seed(recipe.seed)
    model = DualEncoder(recipe.model)
    t0 = time.perf_counter()
    pairs, counts = build_pairs(model, recipe, progress)
    feature_seconds = time.perf_counter() - t0
    summary = {"data": counts, "feature_seconds": round(feature_seconds, 1)}
    summary |= train(model, recipe, pairs, output, progress)
    model.save_pretrained(output / "model")
    summary["eval"] = evaluate(model, recipe, output / "eval", progress)
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
