"""Data builders, converters, LLaVA-row loading, the feature cache, batching and the CLIP loss."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
from pathlib import Path

import pytest
import torch

from llava_lite.contrastive import MAX_LOGIT_SCALE, LogitScale, clip_loss
from llava_lite.data import easyvqa, scenes
from llava_lite.data.converters import convert
from llava_lite.llava_data import DataValidationError, load_rows
from llava_lite.train.batching import BatchSchedule, epoch_batches, shard

FIXTURES = Path(__file__).parent / "fixtures"


# -- easy-VQA ---------------------------------------------------------------------------
def test_easyvqa_sets_keep_the_test_split_held_out():
    caps = easyvqa.build_captions("train")
    vqa = easyvqa.build_vqa("train")
    test = easyvqa.eval_items("test")
    # images with no shape or colour question have no known caption (184 of 4,000)
    assert len(caps) == len(easyvqa.image_facts("train")) == 3816 and len(test) == 9673
    train_images = {r["image"] for r in caps} | {r["image"] for r in vqa}
    assert not train_images & {t["image"] for t in test}
    # one single-question row per training question
    assert len(vqa) == 38575 and all(len(r["conversations"]) == 2 for r in vqa)
    assert {t["type"] for t in test} == {"yes/no", "shape", "color"}


def test_easyvqa_captions_agree_with_the_answers():
    facts = easyvqa.image_facts("train")
    texts, answers, ids = __import__("easy_vqa").get_train_questions()
    for q, a, i in zip(texts, answers, ids, strict=True):
        if q == "what color is the shape?":
            assert facts[i]["color"] == a
    row = easyvqa.build_captions("train")[0]
    image_id = int(Path(row["image"]).stem)
    assert facts[image_id]["color"] in row["conversations"][1]["value"]


def test_easyvqa_colour_and_presence_rows_come_from_training_annotations():
    facts = easyvqa.image_facts("train")
    test_images = {t["image"] for t in easyvqa.eval_items("test")}
    colours = easyvqa.build_colors("train", per_image=2)
    assert len(colours) == 2 * sum(1 for f in facts.values() if "color" in f)
    for row in colours:
        assert row["image"] not in test_images
        image_id = int(Path(row["image"]).stem)
        question, answer = (t["value"] for t in row["conversations"])
        assert answer == facts[image_id]["color"] and question.rstrip("?").lower().split()[-1] in (
            "shape", facts[image_id].get("shape"))
    for row in easyvqa.build_presence("train"):
        question, answer = (t["value"] for t in row["conversations"])
        negated = " not " in question or " no " in question
        assert answer == ("no" if negated else "yes") and row["image"] not in test_images


def test_plain_rows_vary_the_surface_and_answer_in_sentences():
    from llava_lite.data.surface import SHORT_ANSWER

    facts = easyvqa.image_facts("train")
    rows = easyvqa.build_vqa("train", plain=0.4)
    assert rows == easyvqa.build_vqa("train", plain=0.4)  # deterministic
    plain = [r for r in rows if SHORT_ANSWER not in r["conversations"][0]["value"]]
    assert 0.2 < len(plain) / len(rows) < 0.4  # 0.4 of the questions that are not negated
    assert {r["conversations"][0]["value"][8:9].isupper() for r in plain} == {True, False}  # both cases
    assert any(not r["conversations"][0]["value"].endswith("?") for r in plain)
    for row in plain:
        question, answer = (t["value"] for t in row["conversations"])
        assert not easyvqa.is_negated(question), question  # negated questions keep the instruction
        assert answer.endswith(".") and len(answer.split()) >= 2  # a sentence, not one word
        f = facts.get(int(Path(row["image"]).stem), {})
        if "colo" in question.lower() and "color" in f:
            assert f["color"] in answer
    for row in rows:
        question, answer = (t["value"] for t in row["conversations"])
        if SHORT_ANSWER in question:
            assert len(answer.split()) == 1  # with the instruction: one word


def test_colour_and_shape_pairs_are_balanced_and_true():
    facts = easyvqa.image_facts("train")
    rows = [r for r in easyvqa.build_presence("train", pairs=True) if "-pair-" in r["id"]]
    answers = [r["conversations"][1]["value"] for r in rows]
    # one yes and one no for every image whose colour and shape the annotations both give
    assert answers.count("yes") == answers.count("no") == sum("color" in f and "shape" in f for f in facts.values())
    for row in rows:
        question, answer = (t["value"] for t in row["conversations"])
        f = facts[int(Path(row["image"]).stem)]
        assert (f"{f['color']} {f['shape']}" in question) == (answer == "yes"), question


# -- procedural scenes ------------------------------------------------------------------
def test_scenes_are_deterministic_and_answers_match_objects(tmp_path):
    a = scenes.generate("train", 20, tmp_path / "a", seed=3)
    b = scenes.generate("train", 20, tmp_path / "b", seed=3)
    assert [s["objects"] for s in a] == [s["objects"] for s in b]
    assert [s["qa"] for s in a] == [s["qa"] for s in b]
    assert Path(a[0]["image"]).read_bytes() == Path(b[0]["image"]).read_bytes()
    test = scenes.generate("test", 20, tmp_path / "a", seed=3)
    assert [s["objects"] for s in test] != [s["objects"] for s in a]
    for s in a:
        qa = {q: short for q, short, _ in s["qa"]}
        assert qa["How many shapes are there?"] == str(len(s["objects"]))
        for q, short in qa.items():
            if q.startswith("What color is the "):
                shape = q[len("What color is the "):-1]
                assert [o["color"] for o in s["objects"] if o["shape"] == shape] == [short]


def test_scene_image_shows_the_objects_colours(tmp_path):
    from PIL import Image

    scene = scenes.generate("train", 1, tmp_path, seed=11)[0]
    img = Image.open(scene["image"]).convert("RGB")
    found = {rgb for _, rgb in img.getcolors(1 << 16)}
    for obj in scene["objects"]:
        assert scenes.COLORS[obj["color"]] in found


def test_scene_presence_probes_are_balanced_and_true(tmp_path):
    from llava_lite.data.surface import SHORT_ANSWER

    generated = scenes.generate("train", 30, tmp_path, seed=0)
    rows = scenes.to_vqa(generated, SHORT_ANSWER, plain=0.5, presence=2)
    base = scenes.to_vqa(generated, SHORT_ANSWER)
    assert len(rows) == len(base) + 4 * len(generated)
    by_image = {s["image"]: {(o["color"], o["shape"]) for o in s["objects"]} for s in generated}
    probes = [r for r in rows if "there a" in r["conversations"][0]["value"].lower()
              and "left" not in r["conversations"][0]["value"]]
    yes = no = 0
    for row in probes:
        question, answer = (t["value"] for t in row["conversations"])
        color, shape = re.search(r"(\w+) (circle|square|triangle)", question.lower()).groups()
        present = (color, shape) in by_image[row["image"]]
        assert answer.lower().startswith("yes" if present else "no"), (question, answer)
        yes, no = yes + present, no + (not present)
    assert abs(yes - no) <= len(generated) // 2


def test_no_held_out_scene_is_a_training_image(tmp_path):
    """The demo recipe's training scenes and the 200 held-out test scenes share no image."""
    from llava_lite.recipes import get_recipe

    n_train = max(spec.args.get("n", 0) for stage in ("align", "adapter", "instruct")
                  for spec in getattr(get_recipe("demo"), stage).data if spec.name and spec.name.startswith("scenes"))
    digest = lambda s: hashlib.sha1(Path(s["image"]).read_bytes()).hexdigest()  # noqa: E731
    train = {digest(s) for s in scenes.generate("train", n_train, tmp_path, seed=0)}
    test = {digest(s) for s in scenes.generate("test", 200, tmp_path, seed=0)}
    assert n_train >= 1000 and not train & test


# -- general-chat replay -------------------------------------------------------------------
def test_general_replay_is_text_only_disjoint_from_the_held_out_chat_questions(tmp_path):
    from llava_lite.data.builders import build_train_set
    from llava_lite.data.general_replay import PROMPTS, load_replay, whole_sentences
    from llava_lite.eval.general_chat import QUESTIONS

    held_out = {q["question"] for q in json.loads(QUESTIONS.read_text())}
    prompts = json.loads(PROMPTS.read_text())
    assert len(prompts) == len(set(prompts)) >= 50 and not held_out & set(prompts)
    replay = load_replay()
    assert len(replay) >= 50 and {r["conversations"][0]["value"] for r in replay} <= set(prompts)
    rows, bad = load_rows(build_train_set("general-replay", tmp_path, repeat=2), None, "<image>", check_images=False)
    assert not bad and len(rows) == 2 * len(replay) and len({r.id for r in rows}) == len(rows)
    assert all(not r.images and "<image>" not in r.conversations[0]["content"] for r in rows)
    assert whole_sentences("It is Paris. It has many") == "It is Paris."
    assert whole_sentences("Paris") == "Paris" and whole_sentences("Yes! Fine.") == "Yes! Fine."


def test_general_chat_keywords_match_whole_words():
    from llava_lite.eval.general_chat import hit

    assert hit("A spider has 8 legs.", ["8", "eight"]) and not hit("A spider has 80 legs.", ["8", "eight"])


# -- converters ---------------------------------------------------------------------------
def test_convert_lcs558k(tmp_path):
    src = FIXTURES / "blip_laion_cc_sbu_558k_sample.json"
    report = convert("llava-pretrain", src, tmp_path / "out.jsonl")
    assert [r["id"] for r in report.rows] == ["004539375", "002239345", "000694384"]
    assert report.rows[0]["conversations"][0]["value"] == "<image>\nRender a clear and concise summary of the photo."
    assert report.problems == [f"{src}:2: turn 1: empty assistant turn"]
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[1])["image"] == "00223/002239345.jpg"


def test_convert_llava_instruct_mix665k(tmp_path):
    src = FIXTURES / "llava_v1_5_mix665k_sample.json"
    report = convert("llava-instruct", src, tmp_path / "out.json")
    ids = [r["id"] for r in report.rows]
    assert ids == ["000000033471", "VG_100K_2/2398580", "17352", "000000052846"]
    text_only = report.rows[2]
    assert "image" not in text_only and "model" not in text_only
    assert report.rows[1]["conversations"][0]["value"].startswith("<image>\nWhat is the man holding?")
    assert report.rows[3]["conversations"][0]["value"] == "<image>\nWhere is the cat sitting?"
    assert any(p.startswith(f"{src}:3: turn 0: expected a user turn") for p in report.problems)
    assert any(p.startswith(f"{src}:5:") and "no image" in p for p in report.problems)
    assert len(json.loads((tmp_path / "out.json").read_text())) == 4


def test_convert_coco_captions(tmp_path):
    src = FIXTURES / "captions_train2017_sample.json"
    report = convert("coco-captions", src, tmp_path / "c.jsonl", image_prefix="train2017/")
    assert [r["image"] for r in report.rows] == ["train2017/000000391895.jpg"] * 2 + ["train2017/000000522418.jpg"]
    assert report.rows[0]["conversations"][1]["value"] == "A man with a red helmet on a small moped on a dirt road."
    assert len(report.problems) == 2 and "empty caption" in report.problems[0] and "999999" in report.problems[1]
    first_only = convert("coco-captions", src, tmp_path / "d.jsonl", all_captions=False)
    assert len(first_only.rows) == 2


def test_converted_rows_load_with_an_image_root(tmp_path, images):
    report = convert("llava-pretrain", FIXTURES / "blip_laion_cc_sbu_558k_sample.json", tmp_path / "p.jsonl")
    for row in report.rows:
        (tmp_path / "img" / row["image"]).parent.mkdir(parents=True, exist_ok=True)
        images[0].save(tmp_path / "img" / row["image"])
    rows, problems = load_rows(tmp_path / "p.jsonl", image_root=tmp_path / "img", progress=False)
    assert len(rows) == 3 and not problems and Path(rows[0].images[0]).is_file()


def test_load_rows_reads_datasets_folders(tmp_path, images):
    from datasets import Dataset

    images[0].save(tmp_path / "a.png")
    ds = Dataset.from_list([
        {"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ"},
                                                        {"from": "gpt", "value": "A"}]},
        {"id": "y", "image": "a.png", "conversations": [{"from": "human", "value": "Q"},
                                                        {"from": "gpt", "value": "A"}]},
    ])
    ds.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataValidationError, match=r"ds:1: row has 1 image\(s\) but no <image>"):
        load_rows(tmp_path / "ds", image_root=tmp_path, progress=False)


def test_bad_json_files_name_the_line(tmp_path):
    (tmp_path / "a.json").write_text('[{"id": 1,\n "conversations": ]')
    with pytest.raises(DataValidationError, match=r"a.json:line 2: not valid JSON"):
        load_rows(tmp_path / "a.json", progress=False)
    (tmp_path / "b.jsonl").write_text('{"id": 1, "conversations": [{"from": "human", "value": "q"}, '
                                      '{"from": "gpt", "value": "a"}]}\n{oops\n')
    with pytest.raises(DataValidationError, match=r"b.jsonl:1: not valid JSON"):
        load_rows(tmp_path / "b.jsonl", progress=False)


# -- feature cache --------------------------------------------------------------------------
def test_feature_cache_is_keyed_by_tower_and_image_content(tiny_lite, images, tmp_path):
    from llava_lite.config import VisionConfig
    from llava_lite.feature_cache import FeatureCache, tower_key

    lite = tiny_lite(lora=False)
    tower = lite.model.vision_tower
    paths = []
    for i, img in enumerate(images[:3]):
        paths.append(str(tmp_path / f"{i}.png"))
        img.save(paths[-1])
    cache = FeatureCache(tmp_path / "cache", lite.config.vision)
    assert cache.build(paths, tower, batch_size=2, progress=False) == 3
    direct = tower(lite.processor.pixel_values(paths))
    assert torch.allclose(cache.get_many(paths).float(), direct, atol=1e-2, rtol=1e-2)
    # a copy of an image (same bytes, other name) is a hit; a fresh cache object reads from disk
    shutil.copy(paths[0], tmp_path / "copy.png")
    again = FeatureCache(tmp_path / "cache", lite.config.vision)
    assert again.build([*paths, str(tmp_path / "copy.png")], tower, progress=False) == 0
    assert torch.equal(again.get(str(tmp_path / "copy.png")), cache.get(paths[0]))
    other = FeatureCache(tmp_path / "cache", VisionConfig(name="clip", model_id="x", feature_layer=-1))
    assert other.dir != cache.dir and other.missing(paths) == paths
    # widened features get their own folder; configs without them keep the folder they had
    wide = FeatureCache(tmp_path / "cache", VisionConfig(**{**vars(lite.config.vision), "concat_blocks": [5]}))
    assert wide.dir != cache.dir and wide.missing(paths) == paths
    assert tower_key(VisionConfig(name="efficientnet-lite0")) == "efficientnet-lite0-" + hashlib.sha1(json.dumps(
        {"name": "efficientnet-lite0", "model_id": None, "layer": -2, "strategy": "patch"},
        sort_keys=True).encode()).hexdigest()[:12]


# -- batching -----------------------------------------------------------------------------
def test_epoch_batches_cover_each_sample_once_and_group_lengths():
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(1000)]
    batches = epoch_batches(lengths, 8, seed=1, epoch=0, group_by_length=True)
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat)) == 1000
    assert batches == epoch_batches(lengths, 8, seed=1, epoch=0, group_by_length=True)
    assert batches != epoch_batches(lengths, 8, seed=1, epoch=1, group_by_length=True)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    plain = epoch_batches(lengths, 8, seed=1, epoch=0, group_by_length=False)
    spread_plain = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plain) / len(plain)
    assert spread < spread_plain / 4
    sched = BatchSchedule(lengths, 8, seed=1, group_by_length=True)
    assert sched.batch(125) == epoch_batches(lengths, 8, 1, 1, True)[0]
    assert shard(list(range(8)), 1, 2) == [4, 5, 6, 7]


# -- contrastive loss ---------------------------------------------------------------------
def test_clip_loss_matches_a_hand_computation():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    txt = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    scale = torch.tensor(2.0)
    # normalised: img = [[1,0],[0,1]], txt = [[1,0],[s,s]] with s = 1/sqrt(2)
    s = 1 / math.sqrt(2)
    logits = 2.0 * torch.tensor([[1.0, s], [0.0, s]])
    i2t = -(torch.log_softmax(logits, 1)[0, 0] + torch.log_softmax(logits, 1)[1, 1]) / 2
    t2i = -(torch.log_softmax(logits, 0)[0, 0] + torch.log_softmax(logits, 0)[1, 1]) / 2
    assert clip_loss(img, txt, scale).item() == pytest.approx(((i2t + t2i) / 2).item(), rel=1e-6)
    # perfectly separated pairs at a high temperature give a near-zero loss
    eye = torch.eye(4)
    assert clip_loss(eye, eye, torch.tensor(100.0)).item() < 1e-6


def test_logit_scale_is_clamped_at_100():
    scale = LogitScale()
    assert scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        scale.log_scale.fill_(10.0)
    assert scale().item() == pytest.approx(math.exp(MAX_LOGIT_SCALE)) == pytest.approx(100.0)
