"""KV-cache reuse across chat turns: same answers as without it, and only where the images
behind the cached tokens are the same images."""

from __future__ import annotations

import pytest

from llava_lite.prompt_cache import PromptCache, common_prefix_len


def _conversation(lite, first_reply: str, question2: str):
    return [lite.user_message("what is this?"), {"role": "assistant", "content": first_reply},
            {"role": "user", "content": question2}]


def test_second_turn_reuses_the_first_turns_cache_and_answers_the_same(tiny_lite, images):
    lite = tiny_lite(lora=True)
    gen = {"max_new_tokens": 6}
    reply = lite.chat([lite.user_message("what is this?")], images=[images[0]], **gen)
    assert lite.prompt_cache.hits == 0
    turn2 = _conversation(lite, reply, "and the colour?")
    cached = lite.chat(turn2, images=[images[0]], **gen)
    assert lite.prompt_cache.hits == 1 and lite.prompt_cache.reused_tokens > 20
    lite.prompt_cache.clear()
    lite.prompt_cache.capacity = 0
    assert lite.chat(turn2, images=[images[0]], **gen) == cached


def test_streaming_reuses_too_and_matches(tiny_lite, images):
    lite = tiny_lite(lora=False)
    reply = "".join(lite.chat([lite.user_message("hi")], images=[images[1]], stream=True, max_new_tokens=5))
    turn2 = [lite.user_message("hi"), {"role": "assistant", "content": reply or "ok"},
             {"role": "user", "content": "more"}]
    streamed = "".join(lite.chat(turn2, images=[images[1]], stream=True, max_new_tokens=5))
    assert lite.prompt_cache.hits == 1
    lite.prompt_cache.capacity = 0
    assert "".join(lite.chat(turn2, images=[images[1]], stream=True, max_new_tokens=5)) == streamed


def test_a_different_image_behind_the_same_tokens_is_not_reused(tiny_lite, images):
    lite = tiny_lite(lora=False)
    lite.chat([lite.user_message("what is this?")], images=[images[0]], max_new_tokens=4)
    other = lite.chat([lite.user_message("what is this?")], images=[images[2]], max_new_tokens=4)
    # only the text before the image may be reused
    image_start = lite.processor.encode_prompt([lite.user_message("what is this?")]).index(
        lite.processor.image_token_id)
    assert lite.prompt_cache.reused_tokens <= image_start
    lite.prompt_cache.clear()
    lite.prompt_cache.capacity = 0
    assert lite.chat([lite.user_message("what is this?")], images=[images[2]], max_new_tokens=4) == other


class _FakeCache:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_seq_length(self) -> int:
        return self.n

    def crop(self, k: int) -> None:  # transformers 5 semantics: drop -k tokens
        assert k < 0
        self.n += k


def _fake_copy(cache: _FakeCache, n: int) -> _FakeCache:
    return _FakeCache(n)


@pytest.mark.parametrize("new, keys, expected", [
    ([1, 2, 9, 9, 9, 3, 4, 5, 6, 7], ("a",), 8),  # same image, longer prompt: all cached tokens
    ([1, 2, 9, 9, 9, 3, 4, 5], ("a",), 7),  # the new prompt is the cached one: keep one token to run
    ([1, 2, 9, 9, 9, 3, 4, 5, 6], ("b",), 2),  # another image: only the text before it
    ([1, 2, 9, 9, 9, 3, 8, 8, 8], ("a",), 6),  # the text diverges after the image
])
def test_usable_prefix_stops_at_text_or_image_differences(new, keys, expected):
    pc = PromptCache(image_token_id=9, capacity=2, min_reuse=1, copy=_fake_copy)
    stored = _FakeCache(8)
    pc.put([1, 2, 9, 9, 9, 3, 4, 5], ("a",), stored)
    cache, n = pc.take(new, keys)
    assert n == expected and cache.n == expected
    if expected == 8:  # used whole: handed over, never shared by two generations
        assert cache is stored and pc.take(new, keys) == (None, 0)
    else:  # used in part: a copy, and the entry stays whole for its own conversation
        assert cache is not stored and stored.n == 8
        assert pc.take(new, keys)[1] == expected


def test_a_new_chat_copies_the_shared_head_and_leaves_the_other_chats_cache(tiny_lite, images):
    lite = tiny_lite(lora=False)
    first = [lite.user_message("what is this?")]
    reply = lite.chat(first, images=[images[0]], max_new_tokens=4)
    head = lite.processor.encode_prompt(first).index(lite.processor.image_token_id)
    other = lite.chat([lite.user_message("what is that?")], images=[images[2]], max_new_tokens=4)
    assert lite.prompt_cache.hits == 1 and lite.prompt_cache.reused_tokens == head
    # the first chat's follow-up still finds its whole cache
    before = lite.prompt_cache.reused_tokens
    followed = lite.chat(_conversation(lite, reply, "and the colour?"), images=[images[0]], max_new_tokens=4)
    assert lite.prompt_cache.reused_tokens - before > head
    lite.prompt_cache.clear()
    lite.prompt_cache.capacity = 0
    assert lite.chat([lite.user_message("what is that?")], images=[images[2]], max_new_tokens=4) == other
    assert lite.chat(_conversation(lite, reply, "and the colour?"), images=[images[0]], max_new_tokens=4) == followed


def test_copy_prefix_copies_the_first_positions_of_every_layer():
    import torch
    from transformers import DynamicCache

    from llava_lite.prompt_cache import copy_prefix

    layers = [(torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4)) for _ in range(3)]
    cache = DynamicCache(ddp_cache_data=layers)
    part = copy_prefix(cache, 5)
    assert part.get_seq_length() == 5 and len(part.layers) == 3
    for (k, v), layer in zip(layers, part.layers, strict=True):
        assert torch.equal(layer.keys, k[..., :5, :]) and torch.equal(layer.values, v[..., :5, :])
    part.layers[0].keys.add_(1)  # a copy: writing it leaves the source alone
    assert torch.equal(cache.layers[0].keys, layers[0][0])


def test_capacity_evicts_oldest():
    pc = PromptCache(image_token_id=9, capacity=1, min_reuse=1)
    pc.put([1, 2, 3], (), _FakeCache(3))
    pc.put([4, 5, 6], (), _FakeCache(3))
    assert pc.take([1, 2, 3, 4], ())[0] is None
    assert pc.take([4, 5, 6, 7], ())[1] == 3
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
