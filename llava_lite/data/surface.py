"""How people type a question, varied in training so the model answers every form.

A model trained only on "Answer each question with a single word.\\nWhat shape is present?"
answers that form well and the same question typed plainly ("what shape is present") badly.
Training rows here are asked in several surface forms:

- with the answer-format instruction, the question capitalised or lowercase: a one-word answer;
- without it, lowercase or capitalised, with or without the question mark, sometimes in other
  words (`PARAPHRASES`): a short sentence that gives the answer.
"""

from __future__ import annotations

import random
import re

SHORT_ANSWER = "Answer each question with a single word."

# Other wordings of the question templates the data sets use (regex -> replacements). Only
# plain-English rewordings that keep the answer the same.
PARAPHRASES: list[tuple[str, list[str]]] = [
    (r"^what shape is (present|in the image)\?$", ["what shape is this?", "which shape do you see?",
                                                   "what shape is in the picture?", "what is the shape?"]),
    (r"^what color is the (\w+)\?$", [r"what colour is the \1?", r"which color is the \1?",
                                      r"what color does the \1 have?", r"the \1 is what color?"]),
    (r"^how many shapes are there\?$", ["how many shapes are in the picture?", "how many objects are there?",
                                        "count the shapes.", "how many shapes do you see?"]),
    (r"^how many (\w+) shapes are there\?$", [r"how many \1 shapes do you see?", r"count the \1 shapes.",
                                              r"how many \1 objects are there?"]),
    (r"^where is the (\w+)\?$", [r"where is the \1 in the image?", r"in which corner is the \1?",
                                 r"where's the \1?"]),
    (r"^what shape is at the (.+)\?$", [r"which shape is at the \1?", r"what is at the \1?",
                                        r"what do you see at the \1?"]),
    (r"^is there a (.+?)( in the image)?\?$", [r"do you see a \1?", r"is there any \1 in the picture?",
                                               r"can you see a \1?", r"does the image have a \1?"]),
]


def paraphrase(question: str, rng: random.Random) -> str:
    """The question in other words when a template matches, else unchanged."""
    low = question.strip().lower()
    for pattern, options in PARAPHRASES:
        if re.match(pattern, low):
            return re.sub(pattern, rng.choice(options), low)
    return question


def typed(question: str, rng: random.Random) -> str:
    """Case and punctuation as people type: lowercase or capitalised, sometimes no '?'."""
    q = question.strip()
    q = q.lower() if rng.random() < 0.5 else q[:1].upper() + q[1:]
    if q.endswith("?") and rng.random() < 0.25:
        q = q[:-1]
    return q


def ask(question: str, short: str, sentence: str, rng: random.Random, plain: float,
        reword: float = 0.3, instruction: str = SHORT_ANSWER) -> tuple[str, str]:
    """One question turn (text, answer): with probability `plain` the question alone (maybe
    reworded) answered by `sentence`, otherwise the instruction and the question answered in
    one word."""
    if rng.random() < plain:
        q = paraphrase(question, rng) if rng.random() < reword else question
        return typed(q, rng), sentence
    return f"{instruction}\n{typed(question, rng)}", short
