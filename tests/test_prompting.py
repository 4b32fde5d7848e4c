"""Labels come from the tokenizer's own chat template: exactly the assistant answers and their
end-of-turn token are supervised, and every mismatch is a loud error."""

from __future__ import annotations

import pytest
from conftest import LLAMA3_TEMPLATE

from llava_lite.prompting import (
    IGNORE_INDEX,
    ConversationError,
    PromptBuilder,
    SequenceTooLongError,
    TemplateMismatchError,
)

ANSWERS = ["It is a red circle.", "There are two shapes.", "Yes, the square is blue."]
CONV = [
    {"role": "user", "content": "<image>\nWhat is this?"},
    {"role": "assistant", "content": ANSWERS[0]},
    {"role": "user", "content": "How many shapes?"},
    {"role": "assistant", "content": ANSWERS[1]},
    {"role": "user", "content": "Is the square blue?"},
    {"role": "assistant", "content": ANSWERS[2]},
]
N_IMG = 5


@pytest.fixture
def smol_tok(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    from llava_lite.processor import add_image_token

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    return tok, add_image_token(tok, "<image>")


@pytest.fixture
def llama3_tok(smol_tokenizer_dir):
    """A second template family (Llama-3 headers, <|eot_id|>, bos in the template, trimmed content)."""
    from transformers import AutoTokenizer

    from llava_lite.processor import add_image_token

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]},
        replace_extra_special_tokens=False,
    )
    tok.bos_token = "<|begin_of_text|>"
    tok.chat_template = LLAMA3_TEMPLATE
    return tok, add_image_token(tok, "<image>")


def supervised_runs(ids, labels):
    """Contiguous runs of supervised token ids."""
    runs, current = [], []
    for tid, lab in zip(ids, labels, strict=True):
        if lab != IGNORE_INDEX:
            assert lab == tid
            current.append(tid)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def builder(tok_and_id, max_length=512, **kw):
    tok, image_id = tok_and_id
    return PromptBuilder(tok, "<image>", image_id, N_IMG, max_length, **kw)


@pytest.mark.parametrize("family,eot", [("smol_tok", "<|im_end|>"), ("llama3_tok", "<|eot_id|>")])
def test_labels_are_exactly_the_answers_and_end_of_turn(request, family, eot):
    tok, image_id = request.getfixturevalue(family)
    enc = builder((tok, image_id)).encode_conversation(CONV)
    runs = supervised_runs(enc.input_ids, enc.labels)
    assert len(runs) == 3
    for run, answer in zip(runs, ANSWERS, strict=True):
        expected = tok(answer, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids(eot)]
        assert run == expected, (tok.decode(run), answer)
    n_supervised = sum(1 for lab in enc.labels if lab != IGNORE_INDEX)
    assert n_supervised == sum(len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for a in ANSWERS)
    # one image block of N_IMG tokens, never supervised
    assert enc.input_ids.count(image_id) == N_IMG and enc.num_images == 1
    assert all(lab == IGNORE_INDEX for tid, lab in zip(enc.input_ids, enc.labels, strict=True) if tid == image_id)


def test_training_prefix_tokenizes_like_the_inference_prompt(smol_tok):
    b = builder(smol_tok)
    enc = b.encode_conversation(CONV)
    prompt = b.encode_prompt(CONV[:3])  # up to and including the 2nd user turn
    assert enc.input_ids[: len(prompt)] == prompt
    # the next supervised token is the start of the 2nd answer
    assert enc.labels[len(prompt)] != IGNORE_INDEX and enc.labels[len(prompt) - 1] == IGNORE_INDEX


def test_smollm2_default_system_prompt_and_override(smol_tok):
    tok, _ = smol_tok
    default = builder(smol_tok).encode_prompt(CONV[:1])
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(default)
    short = builder(smol_tok, system_prompt="Answer briefly.").encode_prompt(CONV[:1])
    text = tok.decode(short)
    assert "Answer briefly." in text and "SmolLM" not in text


def test_template_that_is_not_prefix_consistent_is_an_error(smol_tok):
    tok, image_id = smol_tok
    # Renders the number of messages first: earlier prefixes never match later renders.
    tok.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    with pytest.raises(TemplateMismatchError):
        builder((tok, image_id)).encode_conversation(CONV)


def test_template_that_drops_the_answer_is_an_error(smol_tok):
    tok, image_id = smol_tok
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% else %}OK<|im_end|>{% endif %}"
        "{% endfor %}"
    )
    with pytest.raises(TemplateMismatchError, match="assistant text not found"):
        builder((tok, image_id)).encode_conversation(CONV)


def test_template_without_end_of_turn_token_is_an_error(smol_tok):
    tok, image_id = smol_tok
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                        "{% if add_generation_prompt %}assistant: {% endif %}"
    with pytest.raises(TemplateMismatchError, match="end-of-turn"):
        builder((tok, image_id)).encode_conversation(CONV)


def test_truncation_drops_whole_turns_and_keeps_the_image_block(smol_tok):
    full = builder(smol_tok).encode_conversation(CONV)
    runs = supervised_runs(full.input_ids, full.labels)
    # end of the 2nd answer
    end2 = [i for i, lab in enumerate(full.labels) if lab != IGNORE_INDEX][len(runs[0]) + len(runs[1]) - 1] + 1
    cut = builder(smol_tok, max_length=end2 + 3).encode_conversation(CONV)
    assert cut.input_ids == full.input_ids[:end2]
    assert len(supervised_runs(cut.input_ids, cut.labels)) == 2
    assert cut.input_ids.count(smol_tok[1]) == N_IMG


def test_answer_that_cannot_fit_is_an_error_not_an_empty_sample(smol_tok):
    enc = builder(smol_tok).encode_conversation(CONV)
    first_label = next(i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX)
    with pytest.raises(SequenceTooLongError, match="truncated away"):
        builder(smol_tok, max_length=first_label + 2).encode_conversation(CONV)


def test_prompt_too_long_for_context(smol_tok):
    with pytest.raises(SequenceTooLongError, match="exceeds the context"):
        builder(smol_tok, max_length=60).encode_prompt(CONV[:1], max_new_tokens=40)


@pytest.mark.parametrize(
    "conv,match",
    [
        ([], "empty"),
        ([{"role": "assistant", "content": "hi"}], "expected a user turn"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "b"}], "empty user turn"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "<image>"}], "placeholder"),
        ([{"role": "robot", "content": "a"}], "unknown role"),
        ([{"role": "user", "content": "a"}], "end with an assistant"),
    ],
)
def test_malformed_conversations(smol_tok, conv, match):
    with pytest.raises(ConversationError, match=match):
        builder(smol_tok).encode_conversation(conv)


def test_llava_style_turns_and_two_images(smol_tok):
    conv = [
        {"from": "human", "value": "<image>\n<image>\nCompare them."},
        {"from": "gpt", "value": "Both are circles."},
    ]
    enc = builder(smol_tok).encode_conversation(conv)
    assert enc.num_images == 2 and enc.input_ids.count(smol_tok[1]) == 2 * N_IMG
