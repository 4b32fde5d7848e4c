"""Every evaluation metric against hand-computed values or a reference implementation."""

from __future__ import annotations

import math

import pytest
import torch

from llava_lite.caption_metrics import bleu, cider_d, tokenize
from llava_lite.pope import build_probes, parse_yes_no, pope_metrics
from llava_lite.retrieval import recall_at_k, retrieval_metrics
from llava_lite.vqa_metrics import normalize_answer, vqa_accuracy

REFS = {
    "1": ["a red circle on a white background", "a small red circle", "there is a red round shape in the picture"],
    "2": ["two blue squares next to a green triangle", "a green triangle and two blue squares",
          "blue squares and a triangle"],
    "3": ["a yellow rectangle", "one yellow rectangle on white", "the image shows a yellow rectangle"],
    "4": ["a man in a uniform", "a portrait of a navy officer", "an officer in uniform in front of a flag"],
}
HYPS = {"1": "a red circle on white", "2": "two blue squares and a green triangle", "3": "a yellow shape",
        "4": "A man in a blue uniform, in front of a flag."}


def test_bleu_and_cider_match_the_coco_caption_reference():
    # Numbers from pycocoevalcap 1.2 (Bleu(4), Cider()) on the same lower-cased tokens.
    assert bleu(HYPS, REFS) == pytest.approx(
        [0.8846153845813609, 0.850750388607309, 0.784339976917498, 0.674347989397508], abs=1e-12)
    assert cider_d(HYPS, REFS) == pytest.approx(3.082920418908194, abs=1e-12)


def test_bleu_by_hand_on_one_sentence():
    # hyp "a b c d" vs ref "a b c e": p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0 (+1e-15 smoothing), same length
    scores = bleu({"x": "a b c d"}, {"x": ["a b c e"]})
    assert scores[0] == pytest.approx(0.75)
    assert scores[1] == pytest.approx(math.sqrt(0.75 * 2 / 3))
    assert scores[2] == pytest.approx((0.75 * 2 / 3 * 0.5) ** (1 / 3))
    assert scores[3] < 1e-3
    # brevity penalty: a 2-word hypothesis against a 4-word reference
    assert bleu({"x": "a b"}, {"x": ["a b c e"]})[0] == pytest.approx(math.exp(1 - 4 / 2))


def test_cider_is_zero_without_overlap_and_rewards_consensus():
    refs = {"a": ["red circle", "a red circle"], "b": ["blue square", "a blue square"]}
    assert cider_d({"a": "green triangle", "b": "yellow star"}, refs) == 0.0
    good = cider_d({"a": "red circle", "b": "blue square"}, refs)
    swapped = cider_d({"a": "blue square", "b": "red circle"}, refs)
    assert good > 1.0 > swapped


def test_caption_metrics_name_missing_references():
    with pytest.raises(ValueError, match="no reference captions"):
        bleu({"x": "a"}, {})
    assert tokenize("A man, in front of a flag.") == ["a", "man", "in", "front", "of", "a", "flag"]


@pytest.mark.parametrize("raw, expected", [
    ("Two dogs.", "2 dogs"),
    ("The cat!", "cat"),
    ("dont know", "don't know"),
    ("yes, it is", "yes it is"),
    ("1,000", "1000"),
    ("a man-made object", "man made object"),
    ("3.5", "3.5"),
    ("  Ten\n", "10"),
    ("an apple", "apple"),
])
def test_vqa_normalization(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_soft_accuracy_leave_one_out():
    # 3 of 10 humans said "2": leaving out one of them leaves 2 matches (2/3), else 3 (capped 1)
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("2", ["2"] * 2 + ["3"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0
    assert vqa_accuracy("The Cat.", ["cat"]) == 1.0  # a single reference: exact match after normalising


OBJECTS = {
    "img1": {"dog", "cat"},
    "img2": {"dog", "ball"},
    "img3": {"dog", "cat", "sofa"},
    "img4": {"car"},
}


def test_pope_probe_counts_and_negative_strategies():
    for strategy in ("random", "popular", "adversarial"):
        probes = build_probes(OBJECTS, strategy, per_image=2, seed=0)
        by_image = {}
        for p in probes:
            by_image.setdefault(p["image"], []).append(p)
            assert (p["object"] in OBJECTS[p["image"]]) == (p["answer"] == "yes")
        # min(2, present, absent) of each per image: img1 2+2, img2 2+2, img3 2+2, img4 1+1
        assert {k: len(v) for k, v in by_image.items()} == {"img1": 4, "img2": 4, "img3": 4, "img4": 2}
    popular = [p["object"] for p in build_probes(OBJECTS, "popular", per_image=2) if p["image"] == "img4"
               and p["answer"] == "no"]
    assert popular == ["dog"]  # the most frequent object, absent from img4
    adversarial = [p["object"] for p in build_probes(OBJECTS, "adversarial", per_image=1)
                   if p["image"] == "img2" and p["answer"] == "no"]
    assert adversarial == ["cat"]  # co-occurs with dog twice


def test_pope_metrics_by_hand():
    preds = ["Yes, there is.", "no", "There is not.", "yes", "No.", "yes"]
    answers = ["yes", "yes", "no", "no", "no", "yes"]
    m = pope_metrics(preds, answers)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 2, 1)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == pytest.approx(3 / 6)
    assert parse_yes_no("") == "no" and parse_yes_no("I see a dog") == "yes"


def test_recall_at_k_on_constructed_embeddings():
    # 4 images on the axes; texts: 0 exact match of image 0, 1 closest to image 2 (wrong),
    # 2 = image 2, 3 between image 3 and image 0 but nearer 0 (wrong at R@1, right at R@2)
    img = torch.eye(4)
    txt = torch.tensor([[1.0, 0, 0, 0], [0, 0.2, 1, 0], [0, 0, 1, 0], [0.8, 0, 0, 0.6]])
    m = retrieval_metrics(img, txt, ks=(1, 2, 4))
    assert m["t2i_R@1"] == pytest.approx(2 / 4)  # texts 0 and 2
    assert m["t2i_R@2"] == pytest.approx(4 / 4)
    # image -> text: image 0 top text 0 (1.0 vs 0.8): hit; image 1 top text 1 (0.196): hit;
    # image 2 top is text 2 (1.0) vs text 1 (0.98): hit; image 3 top text 3: hit
    assert m["i2t_R@1"] == pytest.approx(1.0)
    assert m["matched_cos"] == pytest.approx((1 + 0.2 / math.sqrt(1.04) + 1 + 0.6) / 4)


def test_recall_with_several_captions_per_image():
    sim = torch.tensor([[0.9, 0.1, 0.8], [0.2, 0.3, 0.1]])
    assert recall_at_k(sim, [{2}, {0}], ks=(1, 2)) == {1: 0.0, 2: 1.0}  # both relevant items rank 2nd
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.1], [0.9, 0.2], [0.1, 1.0]])
    m = retrieval_metrics(img, txt, text_image=[0, 0, 1], ks=(1,))
    assert m["i2t_R@1"] == 1.0 and m["t2i_R@1"] == 1.0


def test_recall_when_one_caption_describes_several_images():
    img = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # text 0 fits images 0 and 1 alike
    m = retrieval_metrics(img, txt, text_image=[{0, 1}, 2], ks=(1,))
    assert m["i2t_R@1"] == 1.0 and m["t2i_R@1"] == 1.0
    m = retrieval_metrics(img, txt, text_image=[0, 2], ks=(1,))  # image 1 then has no text
    assert m["i2t_R@1"] == pytest.approx(2 / 3)
