"""`llava-lite eval` tasks beyond exact match: VQA soft accuracy, captioning, POPE,
alignment retrieval per stage, and caption consistency. Each returns a result dict and a
table (rows x metrics) that `write_table_report` turns into JSON, markdown and a PNG."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from llava_lite.api import LlavaLite
from llava_lite.caption_metrics import bleu, cider_d, tokenize
from llava_lite.chair import chair_scores
from llava_lite.exact_match import answer_items
from llava_lite.pope import STRATEGIES, build_probes, pope_metrics
from llava_lite.retrieval import retrieval_metrics
from llava_lite.vqa_metrics import vqa_accuracy

CAPTION_PROMPT = "Describe the image briefly."  # one of the demo recipe's caption prompts


# -- reports ---------------------------------------------------------------------------
def write_table_report(out_dir: Path, title: str, table: dict[str, dict[str, float]], result: dict[str, Any],
                       plot_metrics: Sequence[str] | None = None, percent: bool = True) -> None:
    """result.json (everything), result.md (the table, then any `result["details"]` lines) and
    result.png (grouped bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "result.json").write_text(json.dumps({**result, "table": table}, indent=2) + "\n")
    metrics = list(dict.fromkeys(k for row in table.values() for k in row))
    fmt = (lambda v: f"{v:.2%}") if percent else (lambda v: f"{v:.4f}")
    lines = [f"# {title}", "", "| | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for name, row in table.items():
        cells = [fmt(row[m]) if isinstance(row.get(m), float) else str(row.get(m, "")) for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", *result["details"]] if result.get("details") else []
    (out_dir / "result.md").write_text("\n".join(lines) + "\n")
    shown = [m for m in (plot_metrics or metrics) if all(isinstance(r.get(m), float) for r in table.values())]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(table) * max(1, len(shown)) / 2), 3.8), dpi=100)
    width = 0.8 / max(1, len(shown))
    for i, metric in enumerate(shown):
        xs = [j + i * width for j in range(len(table))]
        bars = ax.bar(xs, [row[metric] for row in table.values()], width, label=metric)
        ax.bar_label(bars, labels=[f"{row[metric]:.2f}" for row in table.values()], fontsize=6)
    ax.set_xticks([j + width * (len(shown) - 1) / 2 for j in range(len(table))], list(table))
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "result.png")
    plt.close(fig)


# -- vqa: a user's question file ---------------------------------------------------------
def load_vqa_items(path: str | Path, image_root: str | Path | None = None) -> list[dict[str, Any]]:
    """Rows of JSON or JSONL: {"image", "question" | "text", "answers": [...] | "answer"}, or
    LLaVA rows whose first human turn is the question and first gpt turn the answer."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: question file not found")
    text = path.read_text()
    try:
        rows = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines()
                                                                 if line.strip()]
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON{'L' if path.suffix != '.json' else ''} ({err})") from err
    root = Path(image_root) if image_root else path.parent
    items = []
    for i, row in enumerate(rows):
        where = f"{path}:{i}"
        if not isinstance(row, dict) or "image" not in row:
            raise ValueError(f"{where}: each row needs an 'image'")
        question = row.get("question", row.get("text"))
        answers = row.get("answers", [row["answer"]] if "answer" in row else None)
        if question is None and "conversations" in row:
            turns = row["conversations"]
            question = next((t["value"] for t in turns if t.get("from") == "human"), None)
            answers = [next((t["value"] for t in turns if t.get("from") == "gpt"), "")]
        if not question or not answers:
            raise ValueError(f"{where}: needs a question and answers")
        answers = [a["answer"] if isinstance(a, dict) else str(a) for a in answers]
        image = Path(row["image"])
        items.append({"image": str(image if image.is_absolute() else root / image),
                      "question": question.replace("<image>", "").strip(), "answers": answers,
                      "type": row.get("answer_type", row.get("question_type", "all"))})
    if not items:
        raise ValueError(f"{path}: no questions")
    return items


def with_forms(items: list[dict[str, Any]], instruction: str) -> list[dict[str, Any]]:
    """Items whose `question` is the bare question, given the fields of the three prompt forms:
    `raw` (the question as written) and the trained form (the instruction, then the question
    capitalised)."""
    return [{**it, "raw": it["question"], "instruction": instruction,
             "question": f"{instruction}\n{it['question'][:1].upper()}{it['question'][1:]}"} for it in items]


def task_vqa(lite: LlavaLite, args) -> tuple[dict, dict]:
    from llava_lite.data.easyvqa import SHORT_ANSWER
    from llava_lite.eval.prompt_forms import evaluate_forms, forms_table

    if not args.questions:
        raise ValueError("--task vqa needs --questions FILE (JSON/JSONL with image, question, answers)")
    items = load_vqa_items(args.questions, args.image_root)
    if args.limit:
        items = random.Random(0).sample(items, min(args.limit, len(items)))
    items = with_forms(items, args.instruction or SHORT_ANSWER)
    result = evaluate_forms(lite, items, args.forms, args.max_new_tokens,
                            score=lambda answer, it: vqa_accuracy(answer, it["answers"]))
    first = result["forms"][args.forms[0]]
    result.update(accuracy=first["accuracy"], n=first["n"])
    return result, forms_table(result["forms"])


# -- caption ----------------------------------------------------------------------------
def load_coco_captions(path: str | Path, image_root: str | Path | None) -> dict[str, list[str]]:
    """COCO caption annotations -> {image path: [reference captions]}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: caption file not found")
    data = json.loads(path.read_text())
    root = Path(image_root) if image_root else path.parent
    files = {img["id"]: str(root / img["file_name"]) for img in data.get("images", [])}
    refs: dict[str, list[str]] = defaultdict(list)
    for i, ann in enumerate(data.get("annotations", [])):
        if ann.get("image_id") not in files:
            raise ValueError(f"{path}: annotations[{i}] names image_id {ann.get('image_id')!r}, not in 'images'")
        refs[files[ann["image_id"]]].append(ann["caption"])
    if not refs:
        raise ValueError(f"{path}: no captions")
    return dict(refs)


def held_out_scenes(n: int) -> list[dict[str, Any]]:
    """The generator's first `n` held-out (test split) scenes."""
    from llava_lite.data.builders import generated_scenes
    from llava_lite.packaged import cache_dir

    return generated_scenes(cache_dir() / "data", "test", n, 0)


def scenes_references(n: int) -> dict[str, list[str]]:
    from llava_lite.data.scenes import caption, scene_objects

    return {s["image"]: [caption(scene_objects(s))] for s in held_out_scenes(n)}


def scenes_chair(hyps: dict[str, str], n: int) -> dict[str, float]:
    """CHAIR scores of captions of the held-out scenes, against each scene's objects."""
    from llava_lite.data.scenes import COLORS, OBJECT_WORDS

    objects = {s["image"]: [(o["color"], o["shape"]) for o in s["objects"]] for s in held_out_scenes(n)}
    images = sorted(hyps)
    return chair_scores([hyps[k] for k in images], [objects[k] for k in images], OBJECT_WORDS, set(COLORS))


def task_caption(lite: LlavaLite, args) -> tuple[dict, dict]:
    refs = load_coco_captions(args.captions, args.image_root) if args.captions else scenes_references(args.scenes)
    images = sorted(refs)[: args.limit or None]
    hyps = {}
    for start in tqdm(range(0, len(images), 8), desc="captions", unit="batch"):
        chunk = images[start:start + 8]
        for img, cap in zip(chunk, lite.ask_batch(chunk, [args.prompt or CAPTION_PROMPT] * len(chunk),
                                                   batch_size=8, max_new_tokens=max(args.max_new_tokens, 48)),
                            strict=True):
            hyps[img] = cap
    refs = {k: refs[k] for k in images}
    b = bleu(hyps, refs)
    scores = {f"BLEU-{k + 1}": b[k] for k in range(4)} | {"CIDEr-D": cider_d(hyps, refs)}
    source = args.captions or f"scene generator held-out split ({len(images)} scenes)"
    table = {"captions": dict(scores)}
    if not args.captions:  # object annotations are known only for generated scenes
        chair = scenes_chair(hyps, args.scenes)
        scores |= chair
        table["hallucination (CHAIR)"] = {k: chair[k] for k in ("CHAIR-i", "CHAIR-s", "recall")}
    result = {**scores, "n": len(images), "source": source, "prompt": args.prompt or CAPTION_PROMPT,
              "not_computed": "METEOR and SPICE (their reference implementations need Java)",
              "predictions": [{"image": k, "caption": hyps[k], "references": refs[k]} for k in images]}
    return result, table


# -- pope -------------------------------------------------------------------------------
def pope_objects(source: str, n: int) -> dict[str, set[str]]:
    """Objects per image ("red circle") from the generator's or easy-VQA's test annotations."""
    if source == "scenes":
        return {s["image"]: {f"{o['color']} {o['shape']}" for o in s["objects"]} for s in held_out_scenes(n)}
    from llava_lite.data.easyvqa import image_facts, image_paths

    facts, paths = image_facts("test"), image_paths("test")
    chosen = sorted(facts)[:n]
    return {paths[i]: {f"{facts[i]['color']} {facts[i]['shape']}"} for i in chosen
            if "color" in facts[i] and "shape" in facts[i]}


def task_pope(lite: LlavaLite, args) -> tuple[dict, dict]:
    """Existence probes on scenes and easy-VQA, each strategy in each prompt form; replies are
    read the POPE way (`parse_yes_no`), so the natural form needs no extractor."""
    from llava_lite.data.easyvqa import SHORT_ANSWER
    from llava_lite.eval.prompt_forms import NATURAL_MAX_NEW_TOKENS, phrase

    table, result = {}, {"predictions": []}
    for source in ("scenes", "easyvqa"):
        objects = pope_objects(source, args.scenes if source == "scenes" else args.limit or 500)
        for strategy in STRATEGIES:
            probes = with_forms(build_probes(objects, strategy, per_image=3, seed=0,
                                             template="is there a {} in the image?"),
                                args.instruction or SHORT_ANSWER)
            result[f"{source}/{strategy}"] = {}
            for form in args.forms:
                asked = [{**p, "question": phrase(p, form)} for p in probes]
                tokens = NATURAL_MAX_NEW_TOKENS if form == "natural" else 4
                preds = answer_items(lite, asked, tokens, desc=f"pope {source}/{strategy}/{form}")
                m = pope_metrics(preds, [p["answer"] for p in probes])
                table[f"{source} {strategy} ({form})"] = {
                    k: m[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
                result[f"{source}/{strategy}"][form] = m
                result["predictions"] += [{**p, "question": q["question"], "prediction": a,
                                           "set": f"{source}/{strategy}", "form": form}
                                          for p, q, a in zip(probes, asked, preds, strict=True)]
    return result, table


# -- alignment ----------------------------------------------------------------------------
@torch.no_grad()
def alignment_metrics(lite: LlavaLite, images: Sequence[str], captions: Sequence[str]) -> dict[str, float]:
    """R@K between mean-pooled projected image tokens and mean-pooled caption token
    embeddings (the LLM's input embeddings), with identical captions merged into one text."""
    texts = list(dict.fromkeys(captions))
    index = {t: j for j, t in enumerate(texts)}
    pooled = []
    for start in range(0, len(images), 16):
        pooled.append(lite.encode_images(list(images[start:start + 16])).float().mean(dim=1))
    image_emb = torch.cat(pooled)
    table = lite.model.llm.get_input_embeddings()
    tok = lite.processor.tokenizer
    text_emb = torch.stack([table(torch.tensor(tok(t, add_special_tokens=False).input_ids,
                                               device=lite.device)).float().mean(0) for t in texts])
    images_of: list[set[int]] = [set() for _ in texts]
    for i, c in enumerate(captions):
        images_of[index[c]].add(i)
    m = retrieval_metrics(image_emb, text_emb, text_image=images_of, ks=(1, 5, 10))
    m["distinct_captions"] = float(len(texts))
    return m


def stage_models(run_dir: str | Path) -> list[tuple[str, Path]]:
    found = sorted(p for p in Path(run_dir).glob("*-*/model") if (p / "config.json").is_file())
    if not found:
        raise FileNotFoundError(f"{run_dir}: no stage folders (N-stage/model) with a checkpoint")
    return [(p.parent.name, p) for p in found]


def task_alignment(lite_or_none, args) -> tuple[dict, dict]:
    from llava_lite.checkpoint import build_model

    refs = scenes_references(args.scenes)
    images = sorted(refs)[: args.limit or None]
    captions = [refs[k][0] for k in images]
    models: list[tuple[str, Any]] = []
    if args.stages:
        stages = stage_models(args.stages)
        first = LlavaLite.from_pretrained(stages[0][1])
        fresh, processor = build_model(first.config, seed=0)  # what the align stage started from
        models.append(("init (untrained projector)", LlavaLite(fresh, processor, "init")))
        models += [(name, path) for name, path in stages]
    else:
        models.append((str(args.model or "default"), lite_or_none))
    table, result = {}, {}
    for name, model in tqdm(models, desc="alignment", unit="model"):
        lite = LlavaLite.from_pretrained(model) if isinstance(model, Path) else model
        m = alignment_metrics(lite, images, captions)
        table[name] = {k: v for k, v in m.items() if k != "distinct_captions"}
        result[name] = m
    result["n_images"] = len(images)
    return result, table


# -- consistency ----------------------------------------------------------------------------
def token_f1(a: str, b: str) -> float:
    ta, tb = Counter(tokenize(a)), Counter(tokenize(b))
    common = sum((ta & tb).values())
    if not ta or not tb or not common:
        return float(not ta and not tb)
    p, r = common / sum(ta.values()), common / sum(tb.values())
    return 2 * p * r / (p + r)


def agreement(samples: Sequence[str]) -> float:
    """Mean pairwise token F1 among sampled captions (1 = all the same words)."""
    pairs = list(itertools.combinations(samples, 2))
    return sum(token_f1(a, b) for a, b in pairs) / len(pairs) if pairs else 1.0


def task_consistency(lite: LlavaLite, args) -> tuple[dict, dict]:
    refs = scenes_references(args.scenes)
    images = sorted(refs)[: args.limit or 50]
    k = max(2, args.samples)
    torch.manual_seed(0)
    rows = []
    for img in tqdm(images, desc="consistency", unit="image"):
        samples = lite.ask_batch([img] * k, [args.prompt or CAPTION_PROMPT] * k, batch_size=k,
                                 max_new_tokens=max(args.max_new_tokens, 48), temperature=args.temperature,
                                 top_p=0.95)
        rows.append({"image": img, "agreement": agreement(samples), "samples": samples,
                     "reference": refs[img][0]})
    flagged = [r for r in rows if r["agreement"] < args.flag_below]
    mean = sum(r["agreement"] for r in rows) / len(rows)
    table = {"captions": {"mean agreement": mean, "flagged share": len(flagged) / len(rows)}}
    result = {"mean_agreement": mean, "flag_below": args.flag_below, "samples_per_image": k,
              "temperature": args.temperature, "n": len(rows), "flagged": flagged, "predictions": rows}
    return result, table


# -- photos ---------------------------------------------------------------------------------
PHOTO_PROMPT = "What is in this picture?"


def task_photos(lite: LlavaLite, args) -> tuple[dict, dict]:
    """Real photos from common wheels: does the reply name the subject, say it can't tell, or
    invent? Also reported for the photos whose right class is in the tower head's top 3."""
    from llava_lite.eval.photos import PHOTOS, photo_path, score_reply, summarize_photos

    prompt = args.prompt or PHOTO_PROMPT
    rows = []
    for photo in tqdm(PHOTOS, desc="photos", unit="photo"):
        image = str(photo_path(photo))
        reply = lite.ask(image, prompt, max_new_tokens=max(args.max_new_tokens, 48))
        top3 = lite.describe_evidence(image, k=3) or []
        rows.append({"photo": photo.name, "image": image, "reply": reply, "head_top3": top3,
                     "right_class_in_top3": bool({name for name, _ in top3} & photo.imagenet),
                     **score_reply(reply, photo)})
    known = [r for r in rows if r["right_class_in_top3"]]
    table = {"all photos": summarize_photos(rows), "right class in the head's top 3": summarize_photos(known)}
    details = ["| photo | reply | named | abstained | invented | head's top 3 |", "|---|---|---|---|---|---|"]
    for r in rows:
        top = ", ".join(f"{n} {p:.2f}" for n, p in r["head_top3"])
        details.append(f"| {r['photo']} | {r['reply'].replace('|', '/').replace(chr(10), ' ')} | "
                       f"{'✓' if r['named'] else ''} | {'✓' if r['abstained'] else ''} | "
                       f"{', '.join(r['invented_words'])} | {top} |")
    result = {**table["all photos"], "prompt": prompt, "details": details, "predictions": rows,
              "right_class_in_top3": table["right class in the head's top 3"]}
    return result, table


TASKS = {"vqa": task_vqa, "caption": task_caption, "pope": task_pope, "photos": task_photos,
         "alignment": task_alignment, "consistency": task_consistency}
