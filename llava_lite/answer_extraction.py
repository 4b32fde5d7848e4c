"""Read a short answer out of a free-form reply, for questions asked the way people ask them.

A person types "what color is the rectangle?" without any answer-format instruction and gets
"The rectangle is red." back. Exact match scores that wrong; a reader scores it right. The
extractor is deliberately narrow, so it credits only replies whose answer is unambiguous:

1. the reply's first word (or phrase) when it is an answer the question does not already
   contain ("Yes, there is a circle." -> yes; "Circle at the top left." -> top left);
2. otherwise the one answer in the reply that the question does not already contain
   ("The rectangle is red." -> red, since "rectangle" came from the question);
3. otherwise the reply's first word, which will not match (two candidate answers, or none).
"""

from __future__ import annotations

from collections.abc import Iterable

from llava_lite.exact_match import normalize_short_answer

NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def answer_tokens(text: str) -> list[str]:
    """Normalised words (see `normalize_short_answer`), with number words as digits."""
    return [NUMBER_WORDS.get(w, w) for w in normalize_short_answer(text).split()]


def _contains(tokens: list[str], phrase: tuple[str, ...]) -> bool:
    n = len(phrase)
    return any(tuple(tokens[i:i + n]) == phrase for i in range(len(tokens) - n + 1))


def extract_answer(reply: str, question: str, vocabulary: Iterable[str]) -> str:
    """The short answer in `reply` to `question`, among the answers in `vocabulary`.

    Returns a normalised answer phrase, or the reply's first word when no single answer can be
    read off (so that scoring it against the reference fails)."""
    phrases = sorted({tuple(answer_tokens(v)) for v in vocabulary} - {()}, key=len, reverse=True)
    tokens = answer_tokens(reply)
    if ("0",) in phrases and ("no",) not in phrases:  # a count: "There are no red shapes." is 0
        tokens = ["0" if t in ("no", "none") else t for t in tokens]
    if not tokens:
        return ""
    asked = answer_tokens(question)
    for phrase in phrases:  # longest first: "top left" before "left"
        if tuple(tokens[:len(phrase)]) == phrase and not _contains(asked, phrase):
            return " ".join(phrase)
    found = [p for p in phrases if _contains(tokens, p) and not _contains(asked, p)]
    # "top left" also contains "left": keep only phrases that are not part of a longer one found
    found = [p for p in found if not any(q != p and _contains(list(q), p) for q in found)]
    return " ".join(found[0]) if len(found) == 1 else tokens[0]


def lenient_match(reply: str, question: str, answer: str, vocabulary: Iterable[str]) -> bool:
    """Whether the answer read off `reply` is `answer` (both normalised the same way)."""
    return extract_answer(reply, question, vocabulary) == " ".join(answer_tokens(answer))
