"""Prometheus metrics for one server, in a registry of its own (`GET /metrics`)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from llava_lite.serve.engine import GenerationStats

# Routes are labelled by what they are, not by their raw path, so a scanner's junk URLs cannot
# create unbounded label values.
NAMED_ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
CONTENT_TYPE = CONTENT_TYPE_LATEST
ERROR_KINDS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 413: "too_large",
               429: "rate_limited", 503: "unavailable"}


def route_label(path: str) -> str:
    if path in NAMED_ROUTES:
        return path
    if path.startswith("/v1/"):
        return "/v1/other"
    return "gradio"  # the chat page, its assets and its own API


def error_kind(status: int) -> str | None:
    if status < 400:
        return None
    return ERROR_KINDS.get(status, "server_error" if status >= 500 else "client_error")


class _CountersCollector:
    """Counters that live on the engine's objects (the batcher's prefills, the prompt cache's
    reuse), read when /metrics is scraped."""

    def __init__(self, counters: Callable[[], dict[str, tuple[str, float]]]) -> None:
        self.counters = counters

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        for name, (doc, value) in self.counters().items():
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    def __init__(self, queue_depth: Callable[[], float], in_flight: Callable[[], float],
                 counters: Callable[[], dict[str, tuple[str, float]]] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llava_lite_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("llava_lite_request_seconds", "HTTP request latency (to the last byte)",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("llava_lite_errors", "failed requests and generations by kind", ["kind"], registry=r)
        self.tokens = Counter("llava_lite_generated_tokens", "tokens generated (all front ends)", registry=r)
        self.generations = Counter("llava_lite_generations", "generations by how they ended", ["finish"],
                                   registry=r)
        self.ttft = Histogram("llava_lite_time_to_first_token_seconds", "time to the first token of a reply",
                              buckets=LATENCY_BUCKETS, registry=r)
        Gauge("llava_lite_queue_depth", "requests waiting for a generation slot", registry=r).set_function(queue_depth)
        Gauge("llava_lite_generations_in_flight", "generations running now", registry=r).set_function(in_flight)
        if counters is not None:
            r.register(_CountersCollector(counters))

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        route = route_label(path)
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        kind = error_kind(status)
        if kind:
            self.errors.labels(kind).inc()

    def observe_generation(self, stats: GenerationStats) -> None:
        self.tokens.inc(stats.completion_tokens)
        self.generations.labels(stats.finish_reason).inc()
        if stats.first_token_s is not None:
            self.ttft.observe(stats.first_token_s)
        if stats.finish_reason == "error":
            self.errors.labels("generation_failed").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
