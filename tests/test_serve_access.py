"""A server a team can share, on a tiny model: API keys, chat-page users and the exposed-address
rule, per-client rate limits, /health and /metrics, the access log, draining, the config file."""

from __future__ import annotations

import base64
import io
import json
import logging

import pytest
from PIL import Image

from llava_lite.config import ConfigError
from llava_lite.serve.auth import API_KEY_ENV, ApiKeys, key_id, resolve_access
from llava_lite.serve.config import AuthConfig, RateLimitConfig, ServeConfig
from llava_lite.serve.engine import ChatEngine, ChatRequest
from llava_lite.serve.limits import ServeLimits
from llava_lite.serve.rate_limit import RateLimiter

KEY, OTHER = "sk-team-alpha-0123456789", "sk-team-beta-9876543210"


def _png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _body(**kw) -> dict:
    content = [{"type": "image_url", "image_url": {"url": _png()}}, {"type": "text", "text": "what is it?"}]
    return {"model": "llava-lite", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **kw}


def _bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


# -- keys and users ------------------------------------------------------------------------
def test_api_keys_accept_only_a_configured_bearer_key():
    keys = ApiKeys([KEY, OTHER])
    assert keys.check(f"Bearer {KEY}") == key_id(KEY) and keys.check(f"bearer {OTHER}") == key_id(OTHER)
    for bad in (None, "", KEY, f"Bearer {KEY}x", f"Basic {KEY}", "Bearer ", f"Bearer {KEY[:-1]}"):
        assert keys.check(bad) is None, bad
    assert not ApiKeys([]) and len(key_id(KEY)) == 8 and KEY not in key_id(KEY)


def test_exposed_address_needs_auth_or_an_explicit_no_auth(monkeypatch, tmp_path):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert resolve_access(AuthConfig(), "127.0.0.1", share=False).warning is None
    for host, share in (("0.0.0.0", False), ("192.168.1.5", False), ("127.0.0.1", True)):
        with pytest.raises(ConfigError, match="no authentication"):
            resolve_access(AuthConfig(), host, share)
    assert "WARNING" in resolve_access(AuthConfig(no_auth=True), "0.0.0.0", False).warning
    keyfile = tmp_path / "keys"
    keyfile.write_text(f"# team keys\n{KEY}\n\n{OTHER}\n")
    users = tmp_path / "users"
    users.write_text("ada:lovelace\n")
    access = resolve_access(AuthConfig(api_key_file=str(keyfile), users_file=str(users)), "0.0.0.0", False)
    assert access.keys.check(f"Bearer {OTHER}") and access.users == [("ada", "lovelace")] and access.warning is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    access = resolve_access(AuthConfig(), "0.0.0.0", False)
    assert access.keys.check("Bearer from-env") and "chat page is open" in access.warning
    with pytest.raises(ConfigError, match="name:password"):
        resolve_access(AuthConfig(users=["nopassword"]), "127.0.0.1", False)


# -- rate limits -----------------------------------------------------------------------------
def test_rate_limiter_refills_per_client_and_caps_concurrency():
    now = [0.0]
    limiter = RateLimiter(RateLimitConfig(requests_per_minute=3, concurrent=1), clock=lambda: now[0])
    assert limiter.admit("a", generation=True) is None
    assert "at once" in limiter.admit("a", generation=True).reason  # one in flight already
    limiter.release("a")
    assert limiter.admit("a", generation=False) is None and limiter.admit("a", generation=False) is None
    refused = limiter.admit("a", generation=False)
    assert refused is not None and refused.retry_after_s == 20  # one token every 20 s at 3/min
    assert limiter.admit("b", generation=False) is None  # another client has its own budget
    now[0] = 20.0
    assert limiter.admit("a", generation=False) is None


# -- the gate on a real app -------------------------------------------------------------------
@pytest.fixture
def app_factory(tiny_lite):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from starlette.middleware import Middleware

    from llava_lite.serve.gate import Gate, GateState
    from llava_lite.serve.metrics import ServerMetrics
    from llava_lite.serve.openai_api import ImagePolicy, build_router
    from llava_lite.serve.ops import build_ops_router

    def make(keys=(), rpm=0, concurrent=0):
        engine = ChatEngine(tiny_lite(lora=False), ServeLimits(max_new_tokens=4))
        metrics = ServerMetrics(lambda: engine.queue_depth, lambda: engine.in_flight, engine.counters)
        engine.on_finish.append(metrics.observe_generation)
        gate = GateState(ApiKeys(list(keys)), RateLimiter(RateLimitConfig(rpm, concurrent)), metrics)
        routes = list(build_router(engine, ImagePolicy()).routes) + list(build_ops_router(engine, gate, metrics).routes)
        app = FastAPI(routes=routes, middleware=[Middleware(Gate, state=gate)])
        return TestClient(app), gate, engine

    return make


def test_api_key_guards_every_v1_route_streaming_or_not(app_factory):
    client, _, _ = app_factory(keys=[KEY])
    for headers in ({}, _bearer("wrong"), {"Authorization": KEY}):
        for res in (client.get("/v1/models", headers=headers),
                    client.post("/v1/chat/completions", json=_body(), headers=headers),
                    client.post("/v1/chat/completions", json=_body(stream=True), headers=headers)):
            assert res.status_code == 401 and res.json()["error"]["type"] == "invalid_api_key"
            assert res.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/models", headers=_bearer(KEY)).status_code == 200
    assert client.post("/v1/chat/completions", json=_body(), headers=_bearer(KEY)).status_code == 200
    streamed = client.post("/v1/chat/completions", json=_body(stream=True), headers=_bearer(KEY))
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    assert client.get("/health").status_code == 200  # operations endpoints stay open


def test_over_budget_client_gets_429_with_retry_after_while_another_key_is_served(app_factory):
    client, _, _ = app_factory(keys=[KEY, OTHER], rpm=2)
    codes = [client.get("/v1/models", headers=_bearer(KEY)).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    refused = client.get("/v1/models", headers=_bearer(KEY))
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limited"
    assert client.post("/v1/chat/completions", json=_body(), headers=_bearer(OTHER)).status_code == 200


def test_health_metrics_and_access_log_agree_with_what_was_served(app_factory, caplog):
    client, gate, engine = app_factory()
    with caplog.at_level(logging.INFO, logger="llava_lite.access"):
        ok = [client.post("/v1/chat/completions", json=_body()) for _ in range(3)]
        bad = client.post("/v1/chat/completions", content="{not json", headers={"content-type": "application/json"})
    assert [r.status_code for r in ok] == [200, 200, 200] and bad.status_code == 400
    tokens = sum(r.json()["usage"]["completion_tokens"] for r in ok)
    health = client.get("/health").json()
    assert health["ready"] and health["model_loaded"] and health["in_flight"] == 0
    text = client.get("/metrics").text
    assert 'llava_lite_requests_total{route="/v1/chat/completions",status="200"} 3.0' in text
    assert 'llava_lite_requests_total{route="/v1/chat/completions",status="400"} 1.0' in text
    assert f"llava_lite_generated_tokens_total {float(tokens)}" in text
    assert 'llava_lite_errors_total{kind="bad_request"} 1.0' in text
    assert "llava_lite_time_to_first_token_seconds_count 3.0" in text and "llava_lite_queue_depth 0.0" in text
    # three prefills, one after another; the second and third reuse the first's cached prompt
    assert "llava_lite_prefill_requests_total 3.0" in text and "llava_lite_prefill_passes_total 3.0" in text
    assert "llava_lite_prompt_cache_hits_total 2.0" in text
    prefilled = engine.batcher.prefilled_tokens
    assert 0 < prefilled and f"llava_lite_prefill_tokens_total {float(prefilled)}" in text
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "llava_lite.access"]
    chats = [line for line in lines if line["route"] == "/v1/chat/completions"]
    assert [c["status"] for c in chats] == [200, 200, 200, 400]
    assert sum(c.get("completion_tokens", 0) for c in chats) == tokens
    assert all(c["request_id"] and "duration_ms" in c for c in chats)
    assert ok[0].headers["x-request-id"] == chats[0]["request_id"]
    assert "what is it" not in caplog.text and "base64" not in caplog.text


def test_keys_never_reach_the_access_log(app_factory, caplog):
    client, _, _ = app_factory(keys=[KEY])
    with caplog.at_level(logging.INFO, logger="llava_lite.access"):
        client.get("/v1/models", headers=_bearer(KEY))
        client.get("/v1/models", headers=_bearer(OTHER))
    assert KEY not in caplog.text and OTHER not in caplog.text and key_id(KEY) in caplog.text


def test_draining_refuses_new_work_and_reports_not_ready(app_factory):
    client, gate, _ = app_factory()
    gate.draining = True
    res = client.post("/v1/chat/completions", json=_body())
    assert res.status_code == 503 and res.headers["retry-after"]
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["ready"] is False


def test_cancel_all_stops_running_generations_at_the_next_token(tiny_lite):
    engine = ChatEngine(tiny_lite(lora=False), ServeLimits(max_new_tokens=200, generation_timeout_s=60))
    png = base64.b64decode(_png().split(",", 1)[1])
    request = ChatRequest([{"role": "user", "content": "<image>\ngo on"}], [png], max_new_tokens=200)
    from llava_lite.serve.engine import GenerationStats

    stats = GenerationStats()
    stream = engine.stream(request, stats)
    next(stream)
    assert engine.in_flight == 1
    engine.cancel_all()
    rest = list(stream)
    assert stats.finish_reason == "cancelled" and stats.completion_tokens < 200 and len(rest) < 199
    assert engine.in_flight == 0


# -- the config file ---------------------------------------------------------------------------
def test_serve_config_file_toml_and_yaml_with_flags_on_top(tmp_path):
    from llava_lite.cli import build_parser
    from llava_lite.serve.cli import serve_config

    toml = tmp_path / "serve.toml"
    toml.write_text('port = 8100\nquantize = "none"\n[limits]\nconcurrency = 3\n'
                    '[auth]\napi_keys = ["k1"]\n[rate_limit]\nrequests_per_minute = 30\n')
    config = serve_config(build_parser().parse_args(["serve", "--config", str(toml), "--concurrency", "5"]))
    assert (config.port, config.quantize, config.limits.concurrency) == (8100, "none", 5)
    assert config.auth.api_keys == ["k1"] and config.rate_limit.requests_per_minute == 30
    yaml = tmp_path / "serve.yaml"
    yaml.write_text("host: 0.0.0.0\nrate_limit:\n  concurrent: 2\n")
    config = ServeConfig.load(yaml)
    assert config.host == "0.0.0.0" and config.rate_limit.concurrent == 2
    for text, needle in (("prot = 1\n", "unknown key"), ("[limits]\nconcurrency = 0\n", "must be positive"),
                         ("port = 'x'\n", "port: input should be a valid integer"),
                         ("[auth]\nusers = ['bad']\n", "name:password"),
                         ("port = \n", "not valid TOML")):
        toml.write_text(text)
        with pytest.raises(ConfigError, match=needle):
            ServeConfig.load(toml)
    with pytest.raises(ConfigError, match="not found"):
        ServeConfig.load(tmp_path / "missing.toml")


def test_the_example_serve_config_is_valid():
    from pathlib import Path

    config = ServeConfig.load(Path(__file__).resolve().parent.parent / "serve" / "serve.example.toml")
    assert config.host == "0.0.0.0" and config.rate_limit.requests_per_minute == 60
    assert config.limits == ServeLimits()  # the file lists the defaults
