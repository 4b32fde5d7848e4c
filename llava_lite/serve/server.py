"""Assemble and run the server: the chat page, the OpenAI-compatible API, `/health` and
`/metrics` on one port, behind one gate (keys, rate limits, access log), with a graceful stop.

On SIGTERM (or Ctrl-C) the server stops taking new work, lets in-flight generations finish
for `shutdown_grace_s`, cancels the rest at their next token, closes, and exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from starlette.middleware import Middleware

from llava_lite.serve.auth import Access
from llava_lite.serve.config import ServeConfig
from llava_lite.serve.engine import ChatEngine
from llava_lite.serve.gate import Gate, GateState
from llava_lite.serve.metrics import ServerMetrics
from llava_lite.serve.native_memory import MallocTrimmer
from llava_lite.serve.openai_api import ImagePolicy, build_router
from llava_lite.serve.ops import build_ops_router
from llava_lite.serve.rate_limit import RateLimiter

log = logging.getLogger("llava_lite.serve")


@dataclass
class RunningServer:
    demo: object
    url: str
    engine: ChatEngine
    gate: GateState
    grace_s: float

    def shutdown(self) -> dict:
        """Drain: refuse new work, wait up to the grace period, cancel what is left, close."""
        self.gate.draining = True
        start = time.monotonic()
        waited_for = self.pending
        while self.pending and time.monotonic() - start < self.grace_s:  # a 2nd signal zeroes grace_s
            time.sleep(0.05)
        cancelled = self.pending
        if cancelled:
            self.engine.cancel_all()  # queued requests that start after this stop at their first token
            stop_by = time.monotonic() + 30
            while self.pending and time.monotonic() < stop_by:
                time.sleep(0.05)
        time.sleep(0.2)  # let the last streamed events reach their clients
        self.demo.close()
        return {"pending_at_stop": waited_for, "cancelled": cancelled, "left_running": self.pending}

    @property
    def pending(self) -> int:
        """Generations running or waiting for a slot."""
        return self.engine.in_flight + self.engine.queue_depth


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access = logging.getLogger("llava_lite.access")
    if not access.handlers:
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False


def start(engine: ChatEngine, config: ServeConfig, access: Access) -> RunningServer:
    """Start serving in background threads and return once the port answers."""
    from llava_lite.serve.app import build_app

    limits = engine.limits
    _setup_logging()
    metrics = ServerMetrics(lambda: engine.queue_depth, lambda: engine.in_flight, engine.counters)
    engine.on_finish.append(metrics.observe_generation)
    engine.on_finish.append(MallocTrimmer())
    gate = GateState(access.keys, RateLimiter(config.rate_limit), metrics)
    # Gradio keeps uploads in its own temp folder; the examples are written next to it.
    cache_dir = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")
    demo = build_app(engine, cache_dir / "llava-lite-examples")
    demo.queue(default_concurrency_limit=limits.concurrency, max_size=limits.queue_size)
    policy = ImagePolicy(config.allow_local_files, max_bytes=limits.max_upload_bytes)
    routes = list(build_router(engine, policy).routes) + list(build_ops_router(engine, gate, metrics).routes)
    # Routes given to the app's constructor come before Gradio's own, so they always win.
    _, local_url, share_url = demo.launch(
        server_name=config.host, server_port=config.port, share=config.share, show_error=False, quiet=True,
        max_file_size=limits.max_upload_bytes, prevent_thread_lock=True,
        auth=access.users or None, auth_message="Log in to chat with llava-lite." if access.users else None,
        app_kwargs={"routes": routes, "middleware": [Middleware(Gate, state=gate)]}, footer_links=["api"],
    )
    if access.warning:
        print(access.warning, file=sys.stderr, flush=True)
    print(f"llava-lite chat on {local_url}  ({engine.describe()})", flush=True)
    print(f"OpenAI-compatible API: {local_url.rstrip('/')}/v1/chat/completions"
          f"{' (API key required)' if access.keys else ''}; /health, /metrics", flush=True)
    if share_url:
        print(f"public share link: {share_url}", flush=True)
    return RunningServer(demo, local_url, engine, gate, config.shutdown_grace_s)


def serve_forever(server: RunningServer) -> int:
    """Block until SIGTERM or Ctrl-C, then shut down gracefully; returns the exit code (0)."""
    stop = threading.Event()

    def request_stop(signum, frame):
        if stop.is_set():  # a second signal: stop waiting for the grace period
            server.grace_s = 0
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    while not stop.wait(0.5):
        pass
    print(f"shutting down: {server.pending} generation(s) running or queued, grace {server.grace_s:g} s",
          flush=True)
    summary = server.shutdown()
    print(f"stopped: {summary}", flush=True)
    return 0
