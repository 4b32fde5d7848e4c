"""The llama.cpp decoder behind `quantize="llamacpp-*"`: the same replies as torch generation,
streaming, KV reuse across turns, and refusal of options it cannot honour. Slow: it needs
llama-cpp-python, which `make test` builds."""

from __future__ import annotations

import copy

import pytest

from llava_lite import LlavaLite
from llava_lite.config import ConfigError

QUESTION = "What is in the picture?"
pytestmark = pytest.mark.slow


@pytest.fixture
def pair(tiny_lite, tmp_path, monkeypatch):
    """(torch reference, llama.cpp f32) on the same tiny CLIP + Llama weights."""
    monkeypatch.setenv("LLAVA_LITE_CACHE", str(tmp_path / "cache"))
    base = tiny_lite(lora=True, seed=7)
    ref = LlavaLite(copy.deepcopy(base.model), base.processor, source="torch").merge_lora()
    fast = base.quantize("llamacpp-f32")
    assert fast.quantization == "llamacpp-f32" and fast.decoder is not None
    return ref, fast


def test_replies_match_torch_greedy_for_each_image(pair, images):
    ref, fast = pair
    replies = [fast.ask(img, QUESTION, max_new_tokens=10, min_new_tokens=10) for img in images[:3]]
    assert replies == [ref.ask(img, QUESTION, max_new_tokens=10, min_new_tokens=10) for img in images[:3]]
    assert len(set(replies)) > 1  # the images reach the decoder


def test_streaming_joins_to_the_reply_and_can_stop_early(pair, images):
    _, fast = pair
    full = fast.ask(images[0], QUESTION, max_new_tokens=12, min_new_tokens=12)
    assert "".join(fast.ask(images[0], QUESTION, max_new_tokens=12, min_new_tokens=12, stream=True)) == full
    chunks = fast.ask(images[0], QUESTION, max_new_tokens=12, min_new_tokens=12, stream=True)
    first = next(chunks)
    chunks.close()  # a Stop button: the decoder is free again at once
    assert full.startswith(first.strip()) and fast.ask(images[0], QUESTION, max_new_tokens=12,
                                                       min_new_tokens=12) == full


def test_a_follow_up_turn_prefills_only_its_new_part(pair, images):
    ref, fast = pair
    turn1 = [fast.user_message(QUESTION)]
    reply = fast.chat(turn1, images=[images[1]], max_new_tokens=6, min_new_tokens=6)
    turn2 = [*turn1, {"role": "assistant", "content": reply}, {"role": "user", "content": "And the colours?"}]
    ids, _, _ = fast._prepare(turn2, [images[1]], 6)
    second = fast.chat(turn2, images=[images[1]], max_new_tokens=6, min_new_tokens=6)
    assert 0 < fast.decoder.last_prefill < len(ids) - 40  # the image and the first turn were kept
    assert second == ref.chat(turn2, images=[images[1]], max_new_tokens=6, min_new_tokens=6)


def test_sampling_runs_and_unknown_options_are_refused(pair, images):
    _, fast = pair
    assert isinstance(fast.ask(images[0], QUESTION, max_new_tokens=5, temperature=0.9, top_p=0.9), str)
    with pytest.raises(ConfigError, match="repetition_penalty"):
        fast.ask(images[0], QUESTION, max_new_tokens=5, repetition_penalty=1.2)
