"""The processor is the one way in: it loads, validates and hashes a request's images once,
renders the template once, and the API, the server and training all go through it."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

import llava_lite.processor as processor_module
from llava_lite.images import ImageLoadError
from llava_lite.prompting import ConversationError
from llava_lite.serve.engine import ChatEngine, ChatRequest, UserFacingError


def _png(color, size=(24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_processor_call_returns_model_inputs(tiny_lite, images):
    lite = tiny_lite(lora=False)
    proc = lite.processor
    out = proc([lite.user_message("what is it?", 2)], images[:2], max_new_tokens=4)
    assert out["input_ids"].shape[0] == 1 and out["attention_mask"].sum() == out["input_ids"].shape[1]
    assert int((out["input_ids"] == proc.image_token_id).sum()) == 2 * proc.num_image_tokens
    assert out["pixel_values"].shape[0] == 2 and len(set(out["image_keys"])) == 2
    # the same tensors the model gets from the API
    prompt = lite.prepare([lite.user_message("what is it?", 2)], images[:2], max_new_tokens=4)
    assert out["input_ids"][0].tolist() == prompt.ids
    assert torch.allclose(lite.model.encode_images(out["pixel_values"]), prompt.embeds)
    with pytest.raises(ConversationError, match="placeholder"):
        proc([lite.user_message("what is it?", 2)], images[:1])


def test_content_parts_use_the_configured_image_token(tiny_lite, images):
    lite = tiny_lite(lora=False, image_token="<img>")
    parts = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "hi"}]}]
    placeholder = [{"role": "user", "content": "<img>\nhi"}]
    assert lite.prepare(parts).ids == lite.prepare(placeholder, [images[0]]).ids
    assert lite.chat(parts, max_new_tokens=3) == lite.chat(placeholder, images=[images[0]], max_new_tokens=3)
    with pytest.raises(ConversationError, match="either inline"):
        lite.prepare(parts, [images[0]])


def test_a_served_request_loads_and_hashes_each_image_once(tiny_lite, monkeypatch):
    lite = tiny_lite(lora=False)
    engine = ChatEngine(lite)
    loads, hashes = [], []
    real_load, real_key = processor_module.load_image, processor_module.image_key
    monkeypatch.setattr(processor_module, "load_image", lambda img, **kw: loads.append(img) or real_load(img, **kw))
    monkeypatch.setattr(processor_module, "image_key", lambda img: hashes.append(img) or real_key(img))
    request = ChatRequest([lite.user_message("what colour?", 2)], [_png((200, 0, 0)), _png((0, 0, 200))],
                          max_new_tokens=3)
    text, stats = engine.complete(request)
    assert len(loads) == 2 and len(hashes) == 2
    assert len(stats.image_views) == 2 and stats.prompt_tokens > 2 * lite.processor.num_image_tokens
    engine.batcher.close() if hasattr(engine.batcher, "close") else None


def test_served_image_errors_name_the_file_not_its_folder(tiny_lite, tmp_path):
    engine = ChatEngine(tiny_lite(lora=False))
    bad = tmp_path / "secret-dir" / "holiday.png"
    bad.parent.mkdir()
    bad.write_bytes(b"not a png")
    with pytest.raises(UserFacingError) as err:
        engine.complete(ChatRequest([engine.lite.user_message("what?")], [str(bad)]))
    assert "holiday.png" in str(err.value) and "secret-dir" not in str(err.value)


def test_image_limits_are_enforced_by_the_processor(tiny_lite):
    lite = tiny_lite(lora=False)
    limits = processor_module.ImageLimits(max_pixels=100)
    with pytest.raises(ImageLoadError, match="pixels"):
        lite.prepare([lite.user_message("what?")], [_png((1, 2, 3), (20, 20))], limits=limits)
    lite.prepare([lite.user_message("what?")], [_png((1, 2, 3), (8, 8))], limits=limits)


def test_training_batches_come_from_the_processor(tiny_lite, images):
    lite = tiny_lite(lora=False)
    enc = lite.processor.encode_training([{"role": "user", "content": "<image>\nwhat?"},
                                          {"role": "assistant", "content": "a square"}])
    batch = lite.processor.collate_training([enc, enc], images=images[:2],
                                            positions=[list(range(len(enc.input_ids)))] * 2)
    assert batch["pixel_values"].shape[0] == 2 and batch["position_ids"].shape == batch["input_ids"].shape
    assert (batch["labels"] != -100).sum() == 2 * sum(lab != -100 for lab in enc.labels)


def test_an_unexpected_failure_while_preparing_is_a_user_facing_error(tiny_lite, monkeypatch):
    engine = ChatEngine(tiny_lite(lora=False))

    def broken(*args, **kwargs):
        raise RuntimeError("tower exploded")

    monkeypatch.setattr(engine.lite, "_views", broken)
    with pytest.raises(UserFacingError, match="something went wrong while reading"):
        engine.complete(ChatRequest([engine.lite.user_message("what?")], [_png((1, 2, 3))]))
    assert engine.in_flight == 0 and engine.queue_depth == 0  # nothing was left holding a slot
