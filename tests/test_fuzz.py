"""Fuzzing (hypothesis, bounded budget): the image loader and the conversation/label builder
either succeed with their invariants intact or raise one of their documented errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from llava_lite.images import ImageLoadError, load_image
from llava_lite.prompting import (
    IGNORE_INDEX,
    ConversationError,
    PromptBuilder,
    SequenceTooLongError,
    TemplateMismatchError,
)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
N_IMG = 3


def _encoded(fmt: str, mode: str = "RGB", size=(17, 11)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 120).save(buf, format=fmt)
    return buf.getvalue()


SEEDS = [_encoded("PNG"), _encoded("JPEG"), _encoded("GIF", "P"), _encoded("BMP"), _encoded("PNG", "LA"),
         _encoded("TIFF", "I;16"), _encoded("WEBP")]


def _check_rgb(img) -> None:
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.width > 0 and img.height > 0


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_never_crash_the_loader(data):
    try:
        _check_rgb(load_image(data))
    except ImageLoadError:
        pass


@FUZZ
@given(st.sampled_from(SEEDS), st.data())
def test_mutated_and_truncated_images(seed, data):
    raw = bytearray(seed)
    for _ in range(data.draw(st.integers(0, 8))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(raw)))
    try:
        _check_rgb(load_image(bytes(raw[:cut]), max_pixels=1 << 20))
    except ImageLoadError:
        pass


@FUZZ
@given(
    st.lists(st.integers(0, 40), min_size=1, max_size=4),
    st.sampled_from([np.uint8, np.uint16, np.int32, np.float32, np.float64, np.bool_]),
    st.sampled_from([0.0, 1.0, 255.0, 65535.0, float("nan"), -5.0]),
)
def test_arbitrary_arrays(shape, dtype, fill):
    try:
        arr = np.full(shape, fill).astype(dtype)
    except (ValueError, OverflowError):
        return
    try:
        _check_rgb(load_image(arr))
    except ImageLoadError:
        pass


@pytest.fixture(scope="module")
def prompt_builder(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    from llava_lite.processor import add_image_token

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    return PromptBuilder(tok, "<image>", add_image_token(tok, "<image>"), N_IMG, max_length=96)


PIECES = [*"ab <>|\n?!é中😀", "<image>", "<|im_end|>", "<|im_start|>", "assistant", " word"]
TEXT = st.lists(st.sampled_from(PIECES), max_size=30).map("".join)
TURN = st.fixed_dictionaries({
    "role": st.sampled_from(["user", "assistant", "system", "human", "gpt", "robot"]),
    "content": st.one_of(TEXT, st.just(""), st.integers(), st.none()),
})


@FUZZ
@given(st.lists(TURN, max_size=7))
def test_conversation_builder_invariants(prompt_builder, turns):
    try:
        enc = prompt_builder.encode_conversation(turns)
    except (ConversationError, SequenceTooLongError, TemplateMismatchError):
        return
    assert len(enc.input_ids) == len(enc.labels) <= prompt_builder.max_length
    supervised = [(t, lab) for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX]
    assert supervised and all(t == lab for t, lab in supervised)
    n_image_tokens = enc.input_ids.count(prompt_builder.image_token_id)
    assert n_image_tokens == enc.num_images * N_IMG
    assert prompt_builder.image_token_id not in [lab for _, lab in supervised]
    # the image block is never cut: image tokens come in whole runs of N_IMG
    run = 0
    for t in [*enc.input_ids, -1]:
        if t == prompt_builder.image_token_id:
            run += 1
        else:
            assert run % N_IMG == 0
            run = 0


@FUZZ
@given(st.lists(TURN, max_size=7))
def test_prompt_builder_never_crashes(prompt_builder, turns):
    try:
        ids = prompt_builder.encode_prompt(turns, max_new_tokens=8)
    except (ConversationError, SequenceTooLongError, TemplateMismatchError):
        return
    assert len(ids) + 8 <= prompt_builder.max_length
