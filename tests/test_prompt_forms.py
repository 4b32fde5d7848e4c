"""Measuring what users meet: the lenient answer extractor, the three prompt forms, and CHAIR
caption-hallucination scores, on hand-written cases."""

from __future__ import annotations

import pytest

from llava_lite.answer_extraction import extract_answer, lenient_match
from llava_lite.chair import Mention, chair_scores, mentions
from llava_lite.eval.prompt_forms import forms_table, is_negated, phrase, summarize

EASYVQA = {"yes", "no", "circle", "rectangle", "triangle", "red", "green", "blue", "yellow", "teal", "brown",
           "gray", "black"}
SCENES = EASYVQA | {"square", "0", "1", "2", "3", "4", "top left", "top right", "bottom left", "bottom right"}


@pytest.mark.parametrize(("reply", "question", "expected"), [
    ("Circle.", "what shape is present?", "circle"),                                 # one word
    ("Yes, there is a red circle.", "is there a red circle?", "yes"),                 # first word
    ("No. The image shows a blue triangle.", "is there a red circle?", "no"),         # first word wins
    ("The color of the rectangle is red.", "what color is the rectangle?", "red"),    # the one new answer
    ("The shape in the image is a triangle.", "what shape is in the image?", "triangle"),
    ("There are two shapes.", "how many shapes are there?", "2"),                     # number words
    ("There are no red shapes.", "how many red shapes are there?", "0"),              # "no" as a count
    ("There is no red circle in the image.", "is there a red circle?", "no"),
    ("The circle is at the top left.", "where is the circle?", "top left"),           # longest phrase
    ("It is red, or maybe brown.", "what color is the shape?", "it"),                 # two answers: none read
    ("The teal shape is a classic example", "what shape is present?", "teal"),        # one new answer, wrong
    ("Arectangle.", "what shape is present?", "arectangle"),                          # glued: not credited
    ("I'm not sure.", "what color is the shape?", "i"),                               # nothing to read
    ("", "what color is the shape?", ""),
])
def test_extractor_reads_the_answer_people_would_read(reply, question, expected):
    vocabulary = {"0", "1", "2", "3", "4"} if "how many" in question else SCENES if "where" in question else EASYVQA
    assert extract_answer(reply, question, vocabulary) == expected


def test_lenient_match_normalises_both_sides():
    assert lenient_match("There are three shapes.", "how many shapes are there?", "3", SCENES)
    assert lenient_match("Two.", "how many shapes?", "two", SCENES)
    assert not lenient_match("The shape is red.", "what color is the shape?", "blue", EASYVQA)


def test_prompt_forms_of_one_item():
    item = {"question": "Answer each question with a single word.\nWhat shape is present?",
            "raw": "what shape is present?", "instruction": "Answer each question with a single word.",
            "answer": "circle"}
    assert phrase(item, "trained") == item["question"]
    assert phrase(item, "raw") == "Answer each question with a single word.\nwhat shape is present?"
    assert phrase(item, "natural") == "what shape is present?"
    with pytest.raises(ValueError, match="unknown prompt form"):
        phrase(item, "shouted")
    with pytest.raises(ValueError, match="only the trained form"):
        phrase({"question": "q?"}, "natural")


def test_negated_questions_are_recognised():
    assert is_negated("is there not a circle?") and is_negated("is no blue shape present?")
    assert not is_negated("is there a circle?") and not is_negated("does the image contain a note?")


def test_forms_table_rows_are_types_and_columns_forms():
    items = [{"type": "shape"}, {"type": "shape"}, {"type": "color"}]
    forms = {"trained": summarize([1, 1, 0], items), "natural": summarize([1, 0, 0], items)}
    table = forms_table(forms)
    assert table["shape"] == {"trained": 1.0, "natural": 0.5, "n": 2}
    assert table["all"]["trained"] == pytest.approx(2 / 3) and table["all"]["n"] == 3


OBJECTS = {"circle": "circle", "square": "square", "rectangle": "square", "triangle": "triangle"}
COLORS = {"red", "blue", "green", "black"}


def test_mentions_take_the_colour_just_before_the_object():
    assert mentions("Two shapes: a small red circle and squares.", OBJECTS, COLORS) == [
        Mention("circle", "red"), Mention("square", None)]
    assert mentions("A red and a blue rectangle on a white background.", OBJECTS, COLORS) == [
        Mention("square", "blue")]


def test_chair_scores_on_constructed_captions():
    scenes = [[("red", "circle"), ("blue", "square")], [("green", "triangle")], [("black", "circle")]]
    captions = [
        "A red circle and a blue square.",          # both right, both recalled
        "A green triangle next to a red circle.",   # the red circle is invented
        "A circle and a triangle.",                 # circle right (no colour given), triangle invented
    ]
    s = chair_scores(captions, scenes, OBJECTS, COLORS)
    assert s["mentions"] == 6 and s["hallucinated"] == 2
    assert s["CHAIR-i"] == pytest.approx(2 / 6)
    assert s["CHAIR-s"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(4 / 4)
    assert chair_scores(["Nothing here."], [[("red", "circle")]], OBJECTS, COLORS)["recall"] == 0.0
    with pytest.raises(ValueError, match="2 captions for 1 images"):
        chair_scores(["a", "b"], [[]], OBJECTS, COLORS)


def test_natural_replies_are_read_among_the_answers_of_the_questions_type():
    from llava_lite.eval.prompt_forms import answer_vocabulary, read_reply

    items = [{"question": "q", "raw": "what shape is at the top left?", "answer": "circle", "type": "shape"},
             {"question": "q", "raw": "what color is the square?", "answer": "red", "type": "color"}]
    vocab = answer_vocabulary(items)
    assert vocab == {"shape": {"circle"}, "color": {"red"}}
    # colour and shape both appear; the question's type decides which is the answer
    assert read_reply("There is a small red circle at the top left.", items[0], "natural", vocab) == "circle"
    assert read_reply("The square is red, next to a circle.", items[1], "natural", vocab) == "red"
    assert read_reply("Circle", items[0], "trained", vocab) == "Circle"  # other forms: exact match


# -- real photos: named, abstained, invented --------------------------------------------------
def test_photo_scorer_on_constructed_replies():
    from llava_lite.eval.photos import PHOTOS, score_reply, summarize_photos

    cat = next(p for p in PHOTOS if p.name == "chelsea")
    hopper = next(p for p in PHOTOS if p.name == "grace_hopper")
    assert score_reply("A majestic cat.", cat) == {"named": True, "abstained": False, "invented": False,
                                                   "named_words": ["cat"], "invented_words": []}
    invented = score_reply("a woman named Sarah. She is wearing a red dress", cat)
    assert invented["invented"] and not invented["named"] and invented["invented_words"] == ["dress", "woman"]
    assert score_reply("A bird of prey.", cat)["invented_words"] == ["bird"]
    assert score_reply("This looks like an Egyptian Mau.", cat)["named"]  # a right ImageNet class
    assert score_reply("Two red circles on a white background.", cat)["invented_words"] == ["circle"]
    unsure = score_reply("I can't tell what this is; it might be a tabby cat.", cat)
    assert unsure["abstained"] and unsure["named"] and not unsure["invented"]
    # a person is in this photo: people words are not invented, and "uniform" names the subject
    assert score_reply("A woman in a military uniform.", hopper) == {
        "named": True, "abstained": False, "invented": False,
        "named_words": ["military", "military uniform", "uniform", "woman"],
        "invented_words": []}
    rows = [score_reply(r, cat) for r in ("A cat.", "Not sure.", "A man.", "A picture.")]
    s = summarize_photos(rows)
    assert s == {"named": 0.25, "abstained": 0.25, "invented": 0.25, "neither named nor abstained": 0.5, "n": 4}


def test_every_photo_ships_in_a_wheel():
    from llava_lite.eval.photos import PHOTOS, photo_path

    assert len(PHOTOS) >= 15
    for photo in PHOTOS:
        assert photo_path(photo).stat().st_size > 1000
