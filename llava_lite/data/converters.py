"""Converters for the public data users bring, into checked LLaVA-format JSONL.

- LLaVA-Pretrain (LCS-558K, `blip_laion_cc_sbu_558k.json`): already LLaVA rows; ids are
  normalised to strings and the image placeholder is put first, as LLaVA's preprocessing does.
- LLaVA-Instruct-150K (`llava_instruct_150k.json`) and `llava_v1_5_mix665k.json`: the same
  row format, with mixed int/str ids, text-only rows (no `image`) and extra keys (`model`).
- COCO captions (`captions_train2017.json`): one caption row per annotation (or the first
  caption per image), with LLaVA's brief-description prompts.

Every converter reports bad rows as `file:index: reason` and writes only good rows, so a
conversion never silently drops data.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llava_lite.llava_data import write_rows
from llava_lite.prompting import ConversationError, check_turns, normalize_messages

IMAGE = "<image>"
# The brief-description prompts LLaVA's LCS-558K rows were built with (a subset).
BRIEF_PROMPTS = [
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
]


class ConversionReport:
    def __init__(self, source: Path) -> None:
        self.source = source
        self.rows: list[dict[str, Any]] = []
        self.problems: list[str] = []

    def bad(self, index: int, reason: str) -> None:
        self.problems.append(f"{self.source}:{index}: {reason}")

    def summary(self) -> str:
        return f"{self.source}: {len(self.rows)} rows converted, {len(self.problems)} bad"


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: input file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:line {err.lineno}: not valid JSON ({err.msg})") from None


def _image_first(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """Move the image placeholder to the start of the first user turn (LLaVA's convention)."""
    first = turns[0]["value"]
    if IMAGE in first:
        text = first.replace(IMAGE, "").strip()
        turns = [{**turns[0], "value": f"{IMAGE}\n{text}"}, *turns[1:]]
    return turns


def _llava_row(raw: Any, index: int, image_first: bool) -> dict[str, Any] | str:
    """One LLaVA row checked and normalised, or the reason it is bad."""
    if not isinstance(raw, dict):
        return f"expected an object, got {type(raw).__name__}"
    turns = raw.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "missing or empty 'conversations'"
    try:
        turns = [{"from": t["from"], "value": t["value"]} for t in turns]
        check_turns(normalize_messages(turns), IMAGE, for_training=True)
    except (KeyError, TypeError):
        return "each turn needs 'from' and 'value'"
    except ConversationError as err:
        return str(err)
    image = raw.get("image")
    placeholders = sum(t["value"].count(IMAGE) for t in turns)
    if not image and placeholders:
        return f"{placeholders} {IMAGE} placeholder(s) but no image"
    if image and placeholders > 1:
        return f"{placeholders} {IMAGE} placeholders for one image"
    if image and placeholders == 0:
        turns[0] = {**turns[0], "value": f"{IMAGE}\n{turns[0]['value']}"}
    if image and image_first:
        turns = _image_first(turns)
    row: dict[str, Any] = {"id": str(raw.get("id", index)), "conversations": turns}
    if image:
        row["image"] = image
    return row


def _convert_llava_rows(path: Path, limit: int | None, image_first: bool) -> ConversionReport:
    report = ConversionReport(path)
    data = _load_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    for index, raw in enumerate(data):
        if limit is not None and len(report.rows) >= limit:
            break
        row = _llava_row(raw, index, image_first)
        if isinstance(row, str):
            report.bad(index, row)
        else:
            report.rows.append(row)
    return report


def convert_llava_pretrain(path: str | Path, limit: int | None = None) -> ConversionReport:
    """LCS-558K (`blip_laion_cc_sbu_558k.json`)."""
    return _convert_llava_rows(Path(path), limit, image_first=True)


def convert_llava_instruct(path: str | Path, limit: int | None = None) -> ConversionReport:
    """LLaVA-Instruct-150K or llava_v1_5_mix665k (text-only rows are kept)."""
    return _convert_llava_rows(Path(path), limit, image_first=True)


def convert_coco_captions(
    path: str | Path, limit: int | None = None, image_prefix: str = "", all_captions: bool = True, seed: int = 0
) -> ConversionReport:
    """COCO captions annotations -> caption rows (`image_prefix` is joined to file_name)."""
    path = Path(path)
    report = ConversionReport(path)
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: not a COCO captions file (needs 'images' and 'annotations' lists)")
    files = {}
    for index, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or not img.get("file_name"):
            report.bad(index, "image entry needs 'id' and 'file_name'")
            continue
        files[img["id"]] = img["file_name"]
    rng = random.Random(seed)
    seen: set[Any] = set()
    for index, ann in enumerate(data["annotations"]):
        if limit is not None and len(report.rows) >= limit:
            break
        where = f"annotations[{index}]"
        if not isinstance(ann, dict) or "image_id" not in ann:
            report.bad(index, f"{where}: needs 'image_id' and 'caption'")
            continue
        caption = ann.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            report.bad(index, f"{where}: empty caption")
            continue
        if ann["image_id"] not in files:
            report.bad(index, f"{where}: image_id {ann['image_id']} not in 'images'")
            continue
        if not all_captions and ann["image_id"] in seen:
            continue
        seen.add(ann["image_id"])
        report.rows.append({
            "id": f"coco-{ann.get('id', index)}",
            "image": f"{image_prefix}{files[ann['image_id']]}",
            "conversations": [{"from": "human", "value": f"{IMAGE}\n{rng.choice(BRIEF_PROMPTS)}"},
                              {"from": "gpt", "value": " ".join(caption.split())}],
        })
    return report


CONVERTERS: dict[str, Callable[..., ConversionReport]] = {
    "llava-pretrain": convert_llava_pretrain,
    "llava-instruct": convert_llava_instruct,
    "coco-captions": convert_coco_captions,
}


def convert(fmt: str, source: str | Path, output: str | Path, **kwargs: Any) -> ConversionReport:
    """Run a converter by exact name and write its good rows (JSON or JSONL by suffix)."""
    if fmt not in CONVERTERS:
        raise KeyError(f"unknown format {fmt!r}; known: {sorted(CONVERTERS)}")
    report = CONVERTERS[fmt](source, **kwargs)
    write_rows(report.rows, output)
    return report
