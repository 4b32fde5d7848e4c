"""Continuous batching on a tiny model: rows that decode together give the same tokens as one
generation at a time, join and leave mid-flight, and keep their own limits."""

from __future__ import annotations

import io
import threading
import time

import pytest
import torch
from PIL import Image

from llava_lite.continuous_batching import ContinuousBatcher
from llava_lite.image_views import PreparedPrompt

TOKEN = "<image>"


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(buf, format="PNG")
    return buf.getvalue()


def _conversations():
    """Prompts of different lengths, so the batch is padded, about different images."""
    texts = ["hi", "what colour is the shape in this picture?", "count them", "is there a red circle on the left?",
             "describe it", "what shape?"]
    return [([{"role": "user", "content": f"{TOKEN}\n{t}"}], [_png((40 * i, 200 - 30 * i, 90))])
            for i, t in enumerate(texts)]


@pytest.fixture
def lite(tiny_lite):
    lite = tiny_lite(lora=False)
    lite.prompt_cache.capacity = 0  # each reference reply from a cold start
    return lite


def _reference(lite, convs, max_new: int) -> list[str]:
    return [lite.chat(m, images=i, max_new_tokens=max_new) for m, i in convs]


def test_batched_greedy_replies_equal_one_at_a_time(lite):
    convs = _conversations()
    expected = _reference(lite, convs, 12)
    batcher = ContinuousBatcher(lite, max_batch=4)  # 6 conversations: two join as others leave
    gens = [batcher.submit(lite.prepare(m, i), max_new_tokens=12) for m, i in convs]
    assert ["".join(g).strip() for g in gens] == expected
    assert batcher.rows_stepped / batcher.steps > 2  # rows really decoded together
    assert all(g.finish_reason in ("stop", "length") and len(g.tokens) <= 12 for g in gens)


def test_rows_join_a_running_batch_and_leave_early(lite):
    convs = _conversations()
    lengths = [3, 20, 7, 15, 1, 9]
    expected = [lite.chat(m, images=i, max_new_tokens=n) for (m, i), n in zip(convs, lengths, strict=True)]
    batcher = ContinuousBatcher(lite, max_batch=8)
    first = [batcher.submit(lite.prepare(m, i), max_new_tokens=n)
             for (m, i), n in zip(convs[:3], lengths[:3], strict=True)]
    next(iter(first[1]))  # the batch is running: the rest join it mid-flight
    late = [batcher.submit(lite.prepare(m, i), max_new_tokens=n)
            for (m, i), n in zip(convs[3:], lengths[3:], strict=True)]
    for gen in first + late:
        gen.wait()
    decode = lite.processor.tokenizer.decode
    assert [decode(g.tokens, skip_special_tokens=True).strip() for g in first + late] == expected
    assert all(len(g.tokens) <= n for g, n in zip(first + late, lengths, strict=True))


def test_a_follow_up_turn_reuses_the_cached_prefix_and_matches(tiny_lite):
    lite = tiny_lite(lora=False)
    messages, images = _conversations()[1]
    batcher = ContinuousBatcher(lite, max_batch=2)
    first = batcher.submit(lite.prepare(messages, images), max_new_tokens=6)
    reply = "".join(first).strip()
    follow = messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": "and the size?"}]
    hits = lite.prompt_cache.hits
    got = "".join(batcher.submit(lite.prepare(follow, images), max_new_tokens=6)).strip()
    assert lite.prompt_cache.hits == hits + 1  # the batcher put the first turn's cache back
    lite.prompt_cache.clear()
    assert got == lite.chat(follow, images=images, max_new_tokens=6)


def test_prompts_prefilled_together_equal_each_prefilled_alone(lite):
    """Rows of different lengths, one continuing a cached prefix: one padded forward gives each
    row the logits and (unpadded) keys and values that its own prefill gives."""
    from transformers import DynamicCache

    from llava_lite.batch_rows import prefill_rows
    from llava_lite.llm import output_cache, with_cache

    llm = lite.model.llm
    embeds = []
    for m, i in _conversations()[:3]:
        prompt = lite.prepare(m, i)
        embeds.append(lite.model.embed(torch.tensor([prompt.ids]), prompt.embeds))
    k = 5

    def prefix():  # a cached first k positions of prompt 0 (built afresh: a prefill extends it)
        out = llm(inputs_embeds=embeds[0][:, :k], use_cache=True, **with_cache(DynamicCache(config=llm.config)))
        return output_cache(out)

    with torch.no_grad():
        inputs = [(prefix(), k, embeds[0][:, k:]), (None, 0, embeds[1]), (None, 0, embeds[2])]
        logits, caches = prefill_rows(lite, inputs)
        for row, (cache, _, new) in enumerate([(prefix(), k, embeds[0][:, k:]), *inputs[1:]]):
            out = llm(inputs_embeds=new, use_cache=True, logits_to_keep=1,
                      **with_cache(cache if cache is not None else DynamicCache(config=llm.config)))
            assert torch.allclose(logits[row], out.logits[0, -1], atol=1e-5)
            for got, want in zip(caches[row].layers, output_cache(out).layers, strict=True):
                assert got.keys.shape == want.keys.shape and torch.allclose(got.keys, want.keys, atol=1e-5)
                assert torch.allclose(got.values, want.values, atol=1e-5)
    assert len({e.shape[1] for e in embeds}) == 3  # the rows really were padded


def test_closing_one_generation_leaves_the_others_unchanged(lite):
    convs = _conversations()[:3]
    expected = _reference(lite, convs, 15)
    batcher = ContinuousBatcher(lite, max_batch=3)
    gens = [batcher.submit(lite.prepare(m, i), max_new_tokens=15) for m, i in convs]
    next(iter(gens[1]))
    gens[1].close()
    assert gens[1].finish_reason == "stop" and len(gens[1].tokens) < 15
    assert ["".join(g).strip() for g in (gens[0], gens[2])] == [expected[0], expected[2]]


def test_timeout_ends_a_row(lite):
    (m, i), = _conversations()[:1]
    timed = ContinuousBatcher(lite).submit(lite.prepare(m, i), max_new_tokens=200, timeout_s=0.2)
    "".join(timed)
    assert timed.finish_reason == "timeout" and len(timed.tokens) < 200


def test_sampled_and_greedy_rows_share_a_batch_until_cancel_all(lite):
    (m, i), (m2, i2) = _conversations()[:2]
    prompt = lite.prepare(m, i, max_new_tokens=60)  # what lite.chat runs, as tokens
    ids, embeds = prompt.ids, prompt.embeds
    expected = lite.model.generate(torch.tensor([ids]), image_embeds=embeds, **lite._gen_kwargs(60))[0].tolist()
    cancel = threading.Event()
    batcher = ContinuousBatcher(lite, max_batch=4, cancel_all=cancel)
    greedy = batcher.submit(lite.prepare(m, i), max_new_tokens=60)
    sampled = batcher.submit(lite.prepare(m2, i2), max_new_tokens=60, temperature=0.9, top_p=0.8)
    chunks = iter(sampled)
    next(chunks)
    cancel.set()
    "".join(chunks), greedy.wait()
    assert sampled.finish_reason == greedy.finish_reason == "cancelled"
    assert 0 < len(sampled.tokens) < 60
    assert greedy.tokens == expected[:len(greedy.tokens)]  # the sampled row did not disturb it


def test_a_bad_request_fails_alone_and_the_worker_ends_when_idle(lite):
    (m, i), (m2, i2) = _conversations()[:2]
    batcher = ContinuousBatcher(lite, max_batch=4)
    good = batcher.submit(lite.prepare(m, i), max_new_tokens=5)
    # image tokens without their embeddings: the prefill fails, for this request only
    bad = batcher.submit(PreparedPrompt(lite.prepare(m2, i2).ids, None, [], []), max_new_tokens=5)
    with pytest.raises(Exception, match="image"):
        "".join(bad)
    assert bad.finish_reason == "error"
    assert "".join(good).strip() == lite.chat(m, images=i, max_new_tokens=5)
    deadline = time.monotonic() + 5
    while batcher._worker is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher._worker is None and batcher.active == 0


def test_a_worker_crash_during_admission_ends_that_generation_too(lite, monkeypatch):
    """A bug past a request's own error handling (here: joining the batch) must not leave the
    generation being admitted, neither pending nor in the batch, waiting forever."""
    (m, i), = _conversations()[:1]
    batcher = ContinuousBatcher(lite, max_batch=2)

    def broken_join(*args):
        raise RuntimeError("join failed")

    monkeypatch.setattr(batcher, "_join", broken_join)
    gen = batcher.submit(lite.prepare(m, i), max_new_tokens=5)
    assert gen.wait(timeout=30), "the generation was left hanging"
    assert gen.finish_reason == "error" and "join failed" in str(gen.error)


def _steps_pass(batcher, n: int) -> None:
    start = batcher.steps
    while batcher.steps < start + n:
        time.sleep(0.001)


def test_while_others_decode_waiting_requests_are_prefilled_together(lite):
    convs = _conversations()
    expected = _reference(lite, convs[1:4], 6)
    batcher = ContinuousBatcher(lite, max_batch=8, prefill_group=3, prefill_wait_s=60.0)
    long = batcher.submit(lite.prepare(*convs[0]), max_new_tokens=400)
    next(iter(long))  # decoding now
    group = []
    for m, i in convs[1:4]:  # arriving a few decode steps apart
        group.append(batcher.submit(lite.prepare(m, i), max_new_tokens=6))
        _steps_pass(batcher, 3)
    assert all(g.wait(timeout=60) for g in group)
    assert [lite.processor.tokenizer.decode(g.tokens, skip_special_tokens=True).strip() for g in group] == expected
    assert (batcher.prefills, batcher.prefilled_rows) == (2, 4)  # the long one alone, then the three in one pass
    long.close()


def test_a_lone_request_waits_no_longer_than_prefill_wait_and_not_at_all_when_idle(lite):
    convs = _conversations()
    batcher = ContinuousBatcher(lite, max_batch=8, prefill_group=4, prefill_wait_s=0.05)
    long = batcher.submit(lite.prepare(*convs[0]), max_new_tokens=400)
    next(iter(long))
    lone = batcher.submit(lite.prepare(*convs[1]), max_new_tokens=3)
    assert lone.wait(timeout=30) and lone.finish_reason in ("stop", "length")
    assert long.finish_reason is None  # admitted after its wait, alone, while the long one decodes
    long.close()
    long.wait(timeout=30)
    idle = ContinuousBatcher(lite, max_batch=8, prefill_group=4, prefill_wait_s=3600.0)
    gen = idle.submit(lite.prepare(*convs[2]), max_new_tokens=3)
    assert gen.wait(timeout=30)  # nothing decoding: no reason to wait for company
    with pytest.raises(ValueError, match="prefill_group"):
        ContinuousBatcher(lite, prefill_group=0)
