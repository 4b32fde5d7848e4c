"""The llama.cpp decoder behind `quantize="llamacpp-*"`: the same replies as torch generation,
streaming, KV reuse across turns, and refusal of options it cannot honour. Slow: it needs
llama-cpp-python, which `make test` builds."""

from __future__ import annotations

import copy

import pytest
import torch

from llava_lite import LlavaLite
from llava_lite.config import ConfigError
from llava_lite.llamacpp_chat import tokens

QUESTION = "What is in the picture?"
pytestmark = pytest.mark.slow


@pytest.fixture
def pair(tiny_lite, tmp_path, monkeypatch):
    """(torch reference, llama.cpp f32) on the same tiny CLIP + Llama weights."""
    monkeypatch.setenv("LLAVA_LITE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(7)  # peft draws LoRA A from the global generator: fix it, whatever ran before
    base = tiny_lite(lora=True, seed=7)
    ref = LlavaLite(copy.deepcopy(base.model), base.processor, source="torch").merge_lora()
    fast = base.quantize("llamacpp-f32")
    assert fast.quantization == "llamacpp-f32" and fast.decoder is not None
    return ref, fast


def _greedy_under_torch(ref, messages, images, tokens: list[int], tol: float = 1e-5) -> bool:
    """Whether `tokens` is torch's greedy continuation up to float noise: teacher-forced, each
    chosen token's logit is within `tol` of the best (relative to that step's largest |logit|).
    Random tiny models have near-ties that 1e-6 differences in summation order can flip; exact
    equality on the real model is measured by `llava-lite eval` (300/300 easy-VQA answers)."""
    prompt = ref.prepare(messages, images, max_new_tokens=len(tokens))
    ids, embeds = prompt.ids, prompt.embeds
    with torch.no_grad():
        full = ref.model.embed(torch.tensor([ids + tokens[:-1]]), embeds)
        logits = ref.model.llm(inputs_embeds=full).logits[0, len(ids) - 1:]
    gaps = [logits[t].max() - logits[t, tok] for t, tok in enumerate(tokens)]
    return all(bool(gap <= tol * logits[t].abs().max()) for t, gap in enumerate(gaps))


def _llamacpp_tokens(fast, messages, images, n: int) -> list[int]:
    prompt = fast.prepare(messages, images, max_new_tokens=n)
    ids, embeds, keys = prompt.ids, prompt.embeds, prompt.keys
    opts = fast._gen_kwargs(max_new_tokens=n, min_new_tokens=n)
    return list(tokens(fast, ids, embeds, keys, opts))


def test_replies_follow_torch_greedy_for_each_image(pair, images):
    ref, fast = pair
    runs = [_llamacpp_tokens(fast, [fast.user_message(QUESTION)], [img], 10) for img in images[:3]]
    assert all(_greedy_under_torch(ref, [ref.user_message(QUESTION)], [img], toks)
               for img, toks in zip(images[:3], runs, strict=True))
    assert len({tuple(t) for t in runs}) > 1  # the images reach the decoder


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
    prompt = fast.prepare(turn2, [images[1]], max_new_tokens=6)
    ids = prompt.ids
    second = fast.chat(turn2, images=[images[1]], max_new_tokens=6, min_new_tokens=6)
    assert 0 < fast.decoder.last_prefill < len(ids) - 40  # the image and the first turn were kept
    assert second == fast.processor.tokenizer.decode(_llamacpp_tokens(fast, turn2, [images[1]], 6),
                                                     skip_special_tokens=True).strip()
    assert _greedy_under_torch(ref, turn2, [images[1]], _llamacpp_tokens(fast, turn2, [images[1]], 6))


def test_sampling_runs_and_unknown_options_are_refused(pair, images):
    _, fast = pair
    assert isinstance(fast.ask(images[0], QUESTION, max_new_tokens=5, temperature=0.9, top_p=0.9), str)
    with pytest.raises(ConfigError, match="repetition_penalty"):
        fast.ask(images[0], QUESTION, max_new_tokens=5, repetition_penalty=1.2)


def _conversations(lite, images, n: int = 6):
    texts = ["hi", "what colour is the shape in this picture?", "count them", "is there a red circle?",
             "describe it", "what shape?"]
    return [([lite.user_message(t)], [images[i % len(images)]]) for i, t in enumerate(texts[:n])]


def test_llamacpp_batcher_rows_equal_one_at_a_time_and_join_mid_flight(pair, images):
    from llava_lite.llamacpp_batching import LlamaCppBatcher

    ref, fast = pair
    convs = _conversations(ref, images)
    lengths = [3, 14, 7, 12, 1, 9]
    batcher = LlamaCppBatcher(fast, max_batch=4, exact_kv=True)  # 6 conversations through 4 slots
    first = [batcher.submit(fast.prepare(m, i), max_new_tokens=n)
             for (m, i), n in zip(convs[:3], lengths[:3], strict=True)]
    next(iter(first[1]))  # running: the rest join mid-flight
    late = [batcher.submit(fast.prepare(m, i), max_new_tokens=n)
            for (m, i), n in zip(convs[3:], lengths[3:], strict=True)]
    for gen in first + late:
        gen.wait()
    gens = first + late
    assert all(0 < len(g.tokens) <= n for g, n in zip(gens, lengths, strict=True))
    assert all(_greedy_under_torch(ref, m, i, g.tokens) for (m, i), g in zip(convs, gens, strict=True))
    assert batcher.rows_stepped / batcher.steps > 1.5  # rows really decoded together


def test_llamacpp_batcher_follow_up_reuses_its_slot_and_close_leaves_others(pair, images):
    from llava_lite.llamacpp_batching import LlamaCppBatcher

    ref, fast = pair
    batcher = LlamaCppBatcher(fast, max_batch=3, exact_kv=True)
    (m, i), (m2, i2), (m3, i3) = _conversations(ref, images, 3)
    reply = "".join(batcher.submit(fast.prepare(m, i), max_new_tokens=6)).strip()
    follow = m + [{"role": "assistant", "content": reply}, {"role": "user", "content": "and the size?"}]
    prompt = fast.prepare(follow, i, max_new_tokens=6)
    ids = prompt.ids
    second = batcher.submit(fast.prepare(follow, i), max_new_tokens=6)
    second.wait()
    assert fast.decoder.last_prefill < len(ids) - 40  # the image and first turn stayed in the slot
    assert _greedy_under_torch(ref, follow, i, second.tokens)
    gens = [batcher.submit(fast.prepare(mm, ii), max_new_tokens=15) for mm, ii in ((m2, i2), (m3, i3))]
    next(iter(gens[0]))
    gens[0].close()
    assert gens[0].finish_reason == "stop" and len(gens[0].tokens) < 15
    gens[1].wait()
    assert _greedy_under_torch(ref, m3, i3, gens[1].tokens)


def test_chat_engine_serves_concurrent_requests_through_llama_cpp_slots(tiny_lite, images, tmp_path, monkeypatch):
    """The server's engine picks the llama.cpp batcher for a llamacpp-* model; concurrent
    requests decode together (f16 KV, as served) and stay within their limits."""
    import io
    import threading

    from llava_lite.llamacpp_batching import LlamaCppBatcher
    from llava_lite.serve.engine import ChatEngine, ChatRequest
    from llava_lite.serve.limits import ServeLimits

    monkeypatch.setenv("LLAVA_LITE_CACHE", str(tmp_path / "cache"))
    engine = ChatEngine(tiny_lite(lora=True, seed=7).quantize("llamacpp-q8_0"), ServeLimits(max_new_tokens=8))
    assert isinstance(engine.batcher, LlamaCppBatcher)
    pngs = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        pngs.append(buf.getvalue())
    results: list = [None] * 4

    def run(k: int) -> None:
        req = ChatRequest([{"role": "user", "content": f"<image>\nquestion {k}?"}], [pngs[k]])
        results[k] = engine.complete(req)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(r is not None and 0 < r[1].completion_tokens <= 8 for r in results)
    assert engine.batcher.rows_stepped / engine.batcher.steps > 1.0  # they shared decode steps
