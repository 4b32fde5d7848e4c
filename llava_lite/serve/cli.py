"""`llava-lite serve` (browser chat and HTTP API) and `llava-lite chat` (terminal)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from llava_lite.serve.limits import ServeLimits


def _load(args):
    from llava_lite import LlavaLite

    return LlavaLite.from_pretrained(args.model, quantize=args.quantize, device=args.device)


def cmd_serve(args) -> int:
    from llava_lite.serve.engine import ChatEngine
    from llava_lite.serve.server import launch

    limits = ServeLimits(**{f.name: getattr(args, f.name) for f in fields(ServeLimits)})
    engine = ChatEngine(_load(args), limits)
    launch(engine, host=args.host, port=args.port, share=args.share, allow_local_files=args.allow_local_files)
    return 0


def cmd_chat(args) -> int:
    from llava_lite.serve.terminal import TerminalChat

    return TerminalChat(_load(args), image=args.image, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature).run()


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder or Llava folder (default: built-in model)")
    p.add_argument("--quantize", default="8bit", choices=["none", "8bit", "4bit"],
                   help="LLM quantization (default: 8bit)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="chat about images in the browser (Gradio) plus an OpenAI-compatible API",
                       description="Serve the chat page and POST /v1/chat/completions on one port.")
    _model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, local only)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--share", action="store_true", help="create a public Gradio share link (off by default)")
    p.add_argument("--allow-local-files", action="append", metavar="DIR", default=None,
                   help="let the API read file:// image URLs under DIR (repeatable; off by default)")
    defaults = ServeLimits()
    helps = {
        "max_upload_mb": "largest upload in MB", "max_image_pixels": "largest image in pixels",
        "max_images": "images per conversation", "max_message_chars": "characters per user message",
        "max_new_tokens": "cap on tokens generated per reply", "concurrency": "generations at once",
        "queue_size": "requests waiting beyond this are refused",
        "queue_timeout_s": "seconds a request may wait for a slot",
        "generation_timeout_s": "seconds before a generation is stopped",
    }
    for f in fields(ServeLimits):
        value = getattr(defaults, f.name)
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(value), default=value,
                       help=f"{helps[f.name]} (default: {value})")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="chat about an image in the terminal",
                       description="Streamed multi-turn chat. Commands: /image PATH, /reset, /help, /quit.")
    _model_args(p)
    p.add_argument("--image", default=None, help="the image to talk about (or use /image PATH later)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per reply (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.set_defaults(func=cmd_chat)
