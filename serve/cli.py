"""`llava-lite serve`: the Gradio chat UI."""

from __future__ import annotations

import argparse


def cmd_serve(args) -> int:
    from llava_lite import LlavaLite
    from serve.app import build_app

    model = LlavaLite.from_pretrained(args.model, quantize=args.quantize)
    app = build_app(model)
    app.queue(default_concurrency_limit=args.concurrency)
    print(f"llava-lite chat on http://{args.host}:{args.port}  (model: {model.source}, "
          f"quantization: {model.quantization})", flush=True)
    app.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=False)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="chat about images in the browser (Gradio)")
    p.add_argument("--model", default=None, help="checkpoint folder or Llava folder (default: built-in model)")
    p.add_argument("--quantize", default="8bit", choices=["none", "8bit", "4bit"],
                   help="LLM quantization (default: 8bit)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, local only)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--concurrency", type=int, default=2, help="generations run at once (default: 2)")
    p.add_argument("--share", action="store_true", help="create a public Gradio share link (off by default)")
    p.set_defaults(func=cmd_serve)
