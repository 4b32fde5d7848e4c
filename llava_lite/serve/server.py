"""Assemble and launch the server: the chat page and the OpenAI-compatible API on one port."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from llava_lite.serve.engine import ChatEngine
from llava_lite.serve.limits import ServeLimits
from llava_lite.serve.openai_api import ImagePolicy, build_router

log = logging.getLogger("llava_lite.serve")


def launch(engine: ChatEngine, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           allow_local_files: list[str] | None = None, block: bool = True):
    """Start serving; returns (app, local_url) when `block` is False."""
    from llava_lite.serve.app import build_app

    limits: ServeLimits = engine.limits
    # Gradio keeps uploads in its own temp folder; the examples are written next to it.
    cache_dir = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")
    demo = build_app(engine, cache_dir / "llava-lite-examples")
    demo.queue(default_concurrency_limit=limits.concurrency, max_size=limits.queue_size)
    router = build_router(engine, ImagePolicy(allow_local_files, max_bytes=limits.max_upload_bytes))
    # Routes given to the app's constructor come before Gradio's own, so they always win.
    _, local_url, share_url = demo.launch(
        server_name=host, server_port=port, share=share, show_error=False, quiet=True,
        max_file_size=limits.max_upload_bytes, prevent_thread_lock=True,
        app_kwargs={"routes": list(router.routes)}, footer_links=["api"],
    )
    print(f"llava-lite chat on {local_url}  ({engine.describe()})", flush=True)
    print(f"OpenAI-compatible API: {local_url.rstrip('/')}/v1/chat/completions", flush=True)
    if share_url:
        print(f"public share link: {share_url}", flush=True)
    if block:
        demo.block_thread()
    return demo, local_url
