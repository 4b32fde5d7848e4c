"""The serving layer on a tiny model: history conversion, the OpenAI request parser and its
image policy, the engine's limits and queue, the HTTP API and the terminal chat."""

from __future__ import annotations

import base64
import io
import json
import os
import time

import pytest
from PIL import Image

from llava_lite.serve.engine import ChatEngine, ChatRequest, ServerBusyError, UserFacingError
from llava_lite.serve.gradio_history import ERROR_MARK, history_to_request
from llava_lite.serve.limits import ServeLimits
from llava_lite.serve.openai_api import ImagePolicy, parse_messages

TOKEN = "<image>"


def _png(color=(200, 30, 30), size=(24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


# -- Gradio history -> model messages ----------------------------------------------------
def test_history_files_attach_to_the_next_text_of_the_turn():
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": "/u/a.png"}}]},
        {"role": "user", "content": [{"type": "text", "text": "what is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]},
    ]
    messages, images = history_to_request(history, "and now?", ["/u/b.png"], TOKEN)
    assert messages == [
        {"role": "user", "content": f"{TOKEN}\nwhat is this?"},
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": f"{TOKEN}\nand now?"},
    ]
    assert images == ["/u/a.png", "/u/b.png"]


def test_history_older_gradio_shapes_are_read_too():
    history = [
        {"role": "user", "content": {"path": "/u/a.png"}},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": ("/u/b.png", None)},
        {"role": "user", "content": "compare"},
        {"role": "assistant", "content": "same"},
    ]
    messages, images = history_to_request(history, "ok", [], TOKEN)
    assert [m["content"] for m in messages] == [f"{TOKEN}\nhi", "hello", f"{TOKEN}\ncompare", "same", "ok"]
    assert images == ["/u/a.png", "/u/b.png"]


def test_a_turn_answered_by_an_error_is_dropped_with_its_files():
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": "/u/broken.png"}}]},
        {"role": "user", "content": "what?"},
        {"role": "assistant", "content": ERROR_MARK + "broken.png: not an image file"},
    ]
    messages, images = history_to_request(history, "hello", ["/u/good.png"], TOKEN)
    assert messages == [{"role": "user", "content": f"{TOKEN}\nhello"}]
    assert images == ["/u/good.png"]


# -- OpenAI messages and the image policy ------------------------------------------------
def test_parse_messages_places_image_tokens_in_part_order():
    policy = ImagePolicy()
    raw = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "compare"},
                                     {"type": "image_url", "image_url": {"url": _data_uri(_png())}},
                                     {"type": "image_url", "image_url": {"url": _data_uri(_png((0, 0, 255)))}}]},
    ]
    messages, images = parse_messages(raw, TOKEN, policy)
    assert messages[0] == {"role": "system", "content": "be brief"}
    assert messages[1]["content"] == f"{TOKEN}\n{TOKEN}\ncompare"
    assert len(images) == 2 and all(isinstance(i, bytes) for i in images)


@pytest.mark.parametrize("raw, needle", [
    ([], "non-empty list"),
    ([{"role": "robot", "content": "x"}], "messages[0]"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "unsupported part type 'audio'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}],
     "does not fetch remote URLs"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}]}],
     "base64 images"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]}],
     "not valid base64"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}],
     "local files are not allowed"),
])
def test_parse_messages_rejects_bad_requests_clearly(raw, needle):
    with pytest.raises(UserFacingError) as err:
        parse_messages(raw, TOKEN, ImagePolicy())
    assert needle in str(err.value)


def test_file_urls_only_inside_allowed_folders_after_resolving_symlinks(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "ok.png").write_bytes(_png())
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (allowed / "link.png").symlink_to(outside)
    policy = ImagePolicy([allowed])
    assert policy.resolve(f"file://{allowed}/ok.png") == str(allowed / "ok.png")
    for url in (f"file://{allowed}/link.png", f"file://{allowed}/../secret.txt", "file:///etc/passwd",
                f"file://{allowed}/%2e%2e/secret.txt", f"file://otherhost{allowed}/ok.png"):
        with pytest.raises(UserFacingError):
            policy.resolve(url)


# -- the engine ---------------------------------------------------------------------------
@pytest.fixture
def engine(tiny_lite):
    return ChatEngine(tiny_lite(lora=False), ServeLimits(max_new_tokens=6, max_images=2, max_message_chars=300))


def _ask(text: str, n_images: int = 1, **kw) -> ChatRequest:
    return ChatRequest([{"role": "user", "content": f"{TOKEN}\n" * n_images + text}],
                       [_png((40 * i, 80, 120)) for i in range(n_images)], **kw)


def test_engine_streams_and_caps_new_tokens(engine):
    text, stats = engine.complete(_ask("what is it?", max_new_tokens=10_000))
    assert stats.prompt_tokens > 0 and stats.first_token_s is not None
    assert stats.completion_tokens <= engine.limits.max_new_tokens
    greedy = engine.lite.chat([{"role": "user", "content": f"{TOKEN}\nwhat is it?"}], images=[_png((0, 80, 120))],
                              max_new_tokens=engine.limits.max_new_tokens)
    assert text.strip() == greedy


def test_warm_up_leaves_the_system_prompt_cached_for_the_first_user_and_changes_no_reply(engine):
    cache = engine.lite.prompt_cache
    engine.warm_up()
    assert cache.hits == 0 and engine.batcher.prefills == 1  # the warm-up's own prefill
    text, _ = engine.complete(_ask("what is it?"))
    req = _ask("what is it?")
    head = engine.lite.prepare(req.messages, req.images).ids.index(engine.lite.processor.image_token_id)
    assert cache.hits == 1 and cache.reused_tokens == head  # the template up to the user's image
    cache.capacity = 0  # nothing cached: the same reply
    assert engine.complete(_ask("what is it?"))[0] == text


@pytest.mark.parametrize("request_kw, max_chars, needle", [
    ({"text": "   "}, 300, "Please type a message"),
    ({"text": "x" * 301}, 300, "the limit is 300"),
    ({"text": "three images", "n_images": 3}, 300, "at most 2"),
    ({"text": "too long " * 200}, 10_000, "too long for the model"),  # over the tiny model's 256 tokens
])
def test_engine_refuses_bad_requests_with_a_message(tiny_lite, request_kw, max_chars, needle):
    limits = ServeLimits(max_new_tokens=6, max_images=2, max_message_chars=max_chars)
    engine = ChatEngine(tiny_lite(lora=False), limits)
    with pytest.raises(UserFacingError) as err:
        engine.complete(_ask(**request_kw))
    assert needle in str(err.value)
    assert engine._slots.acquire(blocking=False)  # a refused request leaves no slot taken


def test_engine_names_a_bad_upload_by_file_name_only(engine, tmp_path):
    bad = tmp_path / "deep" / "folder" / "upload.png"
    bad.parent.mkdir(parents=True)
    bad.write_text("not a picture")
    req = ChatRequest([{"role": "user", "content": f"{TOKEN}\nwhat?"}], [str(bad)])
    with pytest.raises(UserFacingError) as err:
        engine.complete(req)
    assert "upload.png: not an image file" in str(err.value)
    assert str(bad.parent) not in str(err.value)


def test_engine_queue_refuses_when_full(tiny_lite):
    engine = ChatEngine(tiny_lite(lora=False), ServeLimits(concurrency=1, queue_size=1, queue_timeout_s=0.2))
    engine._slots.acquire()  # a generation in progress
    with pytest.raises(ServerBusyError):  # waits 0.2 s for a slot, then gives up
        engine.complete(_ask("hi"))
    engine._waiting = 1  # one request already waiting: the next is refused at once
    start = time.perf_counter()
    with pytest.raises(ServerBusyError):
        engine.complete(_ask("hi"))
    assert time.perf_counter() - start < 0.15


def test_closing_a_stream_stops_generation_and_frees_the_slot(tiny_lite):
    lite = tiny_lite(lora=False)
    engine = ChatEngine(lite, ServeLimits(concurrency=1, max_new_tokens=400))
    finished = []
    engine.on_finish.append(finished.append)
    # A tiny random model rarely stops by itself: it would run all 400 tokens.
    stream = engine.stream(_ask("go", max_new_tokens=400))
    next(stream)
    stream.close()
    assert engine.batcher.active == 0  # the decode batch no longer carries it
    assert finished[0].completion_tokens < 400 and finished[0].finish_reason == "stop"
    assert engine._slots.acquire(blocking=False)


def test_concurrent_requests_decode_as_one_batch_and_match_one_at_a_time(tiny_lite):
    from concurrent.futures import ThreadPoolExecutor

    lite = tiny_lite(lora=False)
    lite.prompt_cache.capacity = 0
    engine = ChatEngine(lite, ServeLimits(concurrency=4, max_new_tokens=10))
    requests = [_ask(q) for q in ("what?", "which colour is it?", "how many are there?", "a shape?")]
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda r: engine.complete(r)[0], requests))
    assert replies == [lite.chat(r.messages, images=r.images, max_new_tokens=10) for r in requests]
    assert engine.batcher.rows_stepped / engine.batcher.steps > 1.5


# -- the HTTP API (FastAPI test client, no server process) ------------------------------
@pytest.fixture
def api(engine):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from llava_lite.serve.openai_api import build_router

    app = FastAPI()
    app.include_router(build_router(engine, ImagePolicy()))
    return TestClient(app)


def _body(**kw) -> dict:
    content = [{"type": "image_url", "image_url": {"url": _data_uri(_png())}}, {"type": "text", "text": "what?"}]
    return {"model": "llava-lite", "messages": [{"role": "user", "content": content}], "max_tokens": 5, **kw}


def test_api_completion_matches_the_engine(api, engine):
    res = api.post("/v1/chat/completions", json=_body())
    assert res.status_code == 200, res.text
    data = res.json()
    assert data["object"] == "chat.completion"
    text = data["choices"][0]["message"]["content"]
    expected, stats = engine.complete(ChatRequest([{"role": "user", "content": f"{TOKEN}\nwhat?"}], [_png()],
                                                  max_new_tokens=5))
    assert text == expected
    assert data["usage"]["prompt_tokens"] == stats.prompt_tokens
    assert data["choices"][0]["finish_reason"] in ("stop", "length")


def test_api_streams_server_sent_events(api):
    res = api.post("/v1/chat/completions", json=_body(stream=True))
    assert res.status_code == 200
    assert res.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in res.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == api.post("/v1/chat/completions", json=_body()).json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("body, status", [
    ("not json", 400),
    ({"messages": "hi"}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400),
    ({"messages": [{"role": "user", "content": "   "}]}, 400),
])
def test_api_bad_requests_get_openai_style_errors(api, body, status):
    res = api.post("/v1/chat/completions", content=body if isinstance(body, str) else json.dumps(body),
                   headers={"content-type": "application/json"})
    assert res.status_code == status
    assert res.json()["error"]["message"]


# -- terminal chat -------------------------------------------------------------------------
def test_terminal_chat_streams_switches_images_and_resets(tiny_lite, tmp_path):
    from llava_lite.serve.terminal import TerminalChat

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(_png((255, 0, 0)))
    b.write_bytes(_png((0, 0, 255)))
    script = io.StringIO(f"what is it?\n/image {b}\nand this?\n/image {tmp_path}/missing.png\n/reset\n"
                         "again?\n/bogus\n/quit\n")
    out = io.StringIO()
    chat = TerminalChat(tiny_lite(lora=False), image=str(a), max_new_tokens=4, stdin=script, stdout=out)
    assert chat.run() == 0
    text = out.getvalue()
    assert "missing.png: image file not found" in text
    assert "(conversation cleared)" in text and "unknown command /bogus" in text
    # after /reset the last image is attached again: one user turn, one image
    assert len(chat.messages) == 2 and len(chat.images) == 1
    assert chat.messages[0]["content"].startswith(TOKEN)
    expected = chat.engine.lite.chat([{"role": "user", "content": f"{TOKEN}\nagain?"}], images=[str(b)],
                                     max_new_tokens=4)
    assert chat.messages[1]["content"].strip() == expected


def test_serve_defaults_are_local_and_private():
    from llava_lite.cli import build_parser
    from llava_lite.serve.cli import serve_config

    config = serve_config(build_parser().parse_args(["serve"]))
    assert config.host == "127.0.0.1" and config.share is False and config.allow_local_files == []
    assert config.quantize == "8bit" and not config.auth.no_auth
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_generation_timeout_stops_a_long_reply(tiny_lite):
    engine = ChatEngine(tiny_lite(lora=False), ServeLimits(max_new_tokens=200, generation_timeout_s=0.05))
    text, stats = engine.complete(_ask("go on", max_new_tokens=200))
    # a tiny random model does not stop on its own; the time limit stops it
    assert stats.finish_reason == "timeout", stats
    assert stats.completion_tokens < 200
    assert stats.total_s < 2.0
