"""Captioning metrics as the COCO caption evaluation computes them: corpus BLEU-1..4 and
CIDEr-D, on lower-cased, punctuation-split tokens.

The numbers match the reference implementation (coco-caption / `pycocoevalcap`) on the same
tokens; a test pins them. METEOR and SPICE are not here: their reference implementations are
Java programs (and SPICE fetches Stanford CoreNLP on first use), which this project does not
require.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

_PUNCT = re.compile(r"[^\w\s']|_")


def tokenize(text: str) -> list[str]:
    """Lower-case, drop punctuation (as coco-caption's PTB tokenizer step does), split."""
    return _PUNCT.sub(" ", text.lower()).split()


def _ngrams(words: Sequence[str], n: int) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def bleu(hyps: Mapping[str, str], refs: Mapping[str, Sequence[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n: clipped n-gram precision pooled over all images, brevity penalty
    against the closest reference length, coco-caption's smoothing constants."""
    _check(hyps, refs)
    tiny, small = 1e-15, 1e-9
    guess, correct = [0] * n, [0] * n
    test_len = ref_len = 0
    for key, hyp in hyps.items():
        h = tokenize(hyp)
        ref_toks = [tokenize(r) for r in refs[key]]
        max_ref: Counter = Counter()
        for r in ref_toks:
            for gram, c in _ngrams(r, n).items():
                max_ref[gram] = max(max_ref[gram], c)
        test_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in ref_toks)[1]
        for gram, c in _ngrams(h, n).items():
            correct[len(gram) - 1] += min(max_ref.get(gram, 0), c)
        for k in range(n):
            guess[k] += max(len(h) - k, 0)
    scores, product = [], 1.0
    ratio = (test_len + tiny) / (ref_len + small)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1 / (k + 1)) * penalty)
    return scores


def cider_d(hyps: Mapping[str, str], refs: Mapping[str, Sequence[str]], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D: tf-idf n-gram cosine (idf from the references of this corpus), clipped
    hypothesis counts, a Gaussian length penalty, averaged over n = 1..4, times 10."""
    _check(hyps, refs)
    keys = list(hyps)
    ref_counts = {k: [_ngrams(tokenize(r), n) for r in refs[k]] for k in keys}
    doc_freq: Counter = Counter()
    for k in keys:
        for gram in set().union(*[set(c) for c in ref_counts[k]]):
            doc_freq[gram] += 1
    log_docs = math.log(float(len(keys)))

    def vec(counts: Counter):
        v = [dict() for _ in range(n)]
        norm = [0.0] * n
        for gram, tf in counts.items():
            k = len(gram) - 1
            v[k][gram] = tf * (log_docs - math.log(max(1.0, doc_freq[gram])))
            norm[k] += v[k][gram] ** 2
        return v, [math.sqrt(x) for x in norm]

    def sim(vh, vr, nh, nr, len_h, len_r) -> list[float]:
        delta = len_h - len_r
        out = []
        for k in range(n):
            val = sum(min(w, vr[k][g]) * vr[k][g] for g, w in vh[k].items() if g in vr[k])
            if nh[k] != 0 and nr[k] != 0:
                val /= nh[k] * nr[k]
            out.append(val * math.exp(-(delta ** 2) / (2 * sigma ** 2)))
        return out

    total = 0.0
    for k in keys:
        h_words = tokenize(hyps[k])
        vh, nh = vec(_ngrams(h_words, n))
        score = [0.0] * n
        for r_text, rc in zip(refs[k], ref_counts[k], strict=True):
            vr, nr = vec(rc)
            score = [a + b for a, b in zip(score, sim(vh, vr, nh, nr, len(h_words), len(tokenize(r_text))),
                                           strict=True)]
        total += sum(score) / n / len(refs[k]) * 10.0
    return total / len(keys)


def _check(hyps: Mapping[str, str], refs: Mapping[str, Sequence[str]]) -> None:
    if not hyps:
        raise ValueError("no captions to score")
    missing = [k for k in hyps if not refs.get(k)]
    if missing:
        raise ValueError(f"no reference captions for {len(missing)} image(s), e.g. {missing[:3]}")
