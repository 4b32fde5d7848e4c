"""`llava-lite eval` for every task, end to end on a tiny checkpoint: it runs, writes the
three reports plus predictions, and its numbers are the metric applied to its predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_lite.caption_metrics import bleu
from llava_lite.cli import main
from llava_lite.eval.tasks import agreement, load_coco_captions, load_vqa_items, token_f1
from llava_lite.vqa_metrics import vqa_accuracy


@pytest.fixture
def tiny_ckpt(tiny_lite, tmp_path) -> Path:
    return tiny_lite(lora=True).save_pretrained(tmp_path / "ckpt")


@pytest.fixture
def image_dir(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _reports(out: Path) -> dict:
    for name in ("result.json", "result.md", "result.png", "predictions.jsonl"):
        assert (out / name).is_file(), name
    return json.loads((out / "result.json").read_text())


def test_vqa_task_scores_its_predictions(tiny_ckpt, image_dir, tmp_path):
    rows = [{"image": f"{i}.png", "question": f"what is {i}?", "answers": ["2", "two", "3"]} for i in range(3)]
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "vqa"
    assert main(["eval", "--model", str(tiny_ckpt), "--task", "vqa", "--questions", str(qfile),
                 "--image-root", str(image_dir), "--out", str(out), "--max-new-tokens", "3"]) == 0
    result = _reports(out)
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 3 * 3  # each question in each prompt form
    for form in ("trained", "raw", "natural"):
        mine = [p for p in preds if p["form"] == form]
        expected = sum(vqa_accuracy(p["read"], p["answers"]) for p in mine) / len(mine)
        assert result["forms"][form]["accuracy"] == pytest.approx(expected)
    assert result["accuracy"] == result["forms"]["trained"]["accuracy"] and result["n"] == 3
    trained, natural = preds[0]["question"], preds[-1]["question"]
    assert trained.startswith("Answer each question with a single word.\nWhat is") and natural == "what is 2?"


def test_vqa_file_errors_name_the_row(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"image": "a.png", "question": "q?", "answers": ["x"]}) + "\n"
                   + json.dumps({"question": "no image"}) + "\n")
    with pytest.raises(ValueError, match=r"q.jsonl:1: each row needs an 'image'"):
        load_vqa_items(bad)
    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([{"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]}]))
    assert load_vqa_items(llava)[0]["question"] == "What color?"


def test_caption_task_on_coco_format(tiny_ckpt, image_dir, tmp_path):
    coco = {"images": [{"id": i, "file_name": f"{i}.png"} for i in range(3)],
            "annotations": [{"image_id": i, "id": 10 + i, "caption": f"a noisy square number {i}"} for i in range(3)]
            + [{"image_id": 0, "id": 20, "caption": "random colored pixels"}]}
    cfile = tmp_path / "captions.json"
    cfile.write_text(json.dumps(coco))
    assert len(load_coco_captions(cfile, image_dir)[str(image_dir / "0.png")]) == 2
    out = tmp_path / "cap"
    assert main(["eval", "--model", str(tiny_ckpt), "--task", "caption", "--captions", str(cfile),
                 "--image-root", str(image_dir), "--out", str(out), "--max-new-tokens", "4"]) == 0
    result = _reports(out)
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert result["BLEU-4"] == pytest.approx(bleu({p["image"]: p["caption"] for p in preds},
                                                  {p["image"]: p["references"] for p in preds})[3])
    assert "CIDEr-D" in result and "Java" in result["not_computed"]


def test_pope_alignment_and_consistency_tasks(tiny_ckpt, tmp_path):
    out = tmp_path / "pope"
    assert main(["eval", "--model", str(tiny_ckpt), "--task", "pope", "--scenes", "4", "--limit", "4",
                 "--out", str(out)]) == 0
    result = _reports(out)
    for key in ("scenes/random", "scenes/popular", "scenes/adversarial", "easyvqa/adversarial"):
        assert set(result[key]) == {"trained", "raw", "natural"}
        for m in result[key].values():
            assert m["tp"] + m["fp"] + m["tn"] + m["fn"] == m["n"] > 0
            assert m["tp"] + m["fn"] == m["fp"] + m["tn"]  # as many present as absent probes
    out = tmp_path / "align"
    assert main(["eval", "--model", str(tiny_ckpt), "--task", "alignment", "--scenes", "6", "--out", str(out)]) == 0
    table = json.loads((out / "result.json").read_text())["table"]
    (row,) = table.values()
    assert 0.0 <= row["i2t_R@1"] <= row["i2t_R@5"] <= row["i2t_R@10"] <= 1.0
    out = tmp_path / "cons"
    assert main(["eval", "--model", str(tiny_ckpt), "--task", "consistency", "--scenes", "3", "--limit", "2",
                 "--samples", "3", "--max-new-tokens", "4", "--out", str(out)]) == 0
    result = _reports(out)
    assert result["n"] == 2 and 0.0 <= result["mean_agreement"] <= 1.0


def test_agreement_by_hand():
    assert token_f1("a red circle", "a red square") == pytest.approx(2 / 3)
    assert agreement(["red circle", "red circle", "blue square"]) == pytest.approx((1 + 0 + 0) / 3)


def test_caption_task_on_scenes_reports_chair_against_the_scene_objects(tiny_ckpt, tmp_path):
    from llava_lite.chair import chair_scores
    from llava_lite.data.scenes import COLORS, OBJECT_WORDS
    from llava_lite.eval.tasks import held_out_scenes

    out = tmp_path / "cap"
    assert main(["eval", "--model", str(tiny_ckpt), "--task", "caption", "--scenes", "3", "--out", str(out),
                 "--max-new-tokens", "4"]) == 0
    result = _reports(out)
    preds = {p["image"]: p["caption"] for p in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    scenes = held_out_scenes(3)
    expected = chair_scores([preds[s["image"]] for s in scenes],
                            [[(o["color"], o["shape"]) for o in s["objects"]] for s in scenes],
                            OBJECT_WORDS, set(COLORS))
    assert {k: result[k] for k in ("CHAIR-i", "CHAIR-s", "recall")} == {k: expected[k] for k in
                                                                        ("CHAIR-i", "CHAIR-s", "recall")}
    assert "hallucination (CHAIR)" in json.loads((out / "result.json").read_text())["table"]
