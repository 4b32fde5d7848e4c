"""`llava-lite serve` (browser chat and HTTP API) and `llava-lite chat` (terminal)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from llava_lite.serve.config import SERVE_QUANTIZE
from llava_lite.serve.limits import ServeLimits

# flag -> (section, field) of ServeConfig; flags left out keep the config file's value
SECTION_FLAGS = {
    "api_key": ("auth", "api_keys"), "api_key_file": ("auth", "api_key_file"), "auth": ("auth", "users"),
    "auth_file": ("auth", "users_file"), "no_auth": ("auth", "no_auth"),
    "rate_limit_rpm": ("rate_limit", "requests_per_minute"), "rate_limit_concurrent": ("rate_limit", "concurrent"),
}
TOP_FLAGS = ("model", "quantize", "device", "host", "port", "share", "allow_local_files", "shutdown_grace_s")


def _load(args):
    from llava_lite import LlavaLite

    return LlavaLite.from_pretrained(args.model, quantize=args.quantize, device=args.device)


def serve_config(args):
    """The serve config file (if any) with every flag that was given applied on top."""
    from llava_lite.serve.config import ServeConfig

    config = ServeConfig.load(args.config) if args.config else ServeConfig()
    data = config.with_overrides(args.overrides).to_dict()
    for name in TOP_FLAGS:
        if getattr(args, name) is not None:
            data[name] = getattr(args, name)
    for name, (section, key) in SECTION_FLAGS.items():
        if getattr(args, name) is not None:
            data[section][key] = getattr(args, name)
    for f in fields(ServeLimits):
        if getattr(args, f.name) is not None:
            data["limits"][f.name] = getattr(args, f.name)
    return ServeConfig.from_dict(data, source="command line")


def cmd_serve(args) -> int:
    from llava_lite import LlavaLite
    from llava_lite.serve.auth import resolve_access
    from llava_lite.serve.engine import ChatEngine
    from llava_lite.serve.native_memory import limit_malloc_arenas
    from llava_lite.serve.server import serve_forever, start

    limit_malloc_arenas()
    config = serve_config(args)
    access = resolve_access(config.auth, config.host, config.share)  # refuses before the model loads
    lite = LlavaLite.from_pretrained(config.model, quantize=config.quantize, device=config.device)
    engine = ChatEngine(lite, config.limits)
    engine.warm_up()
    server = start(engine, config, access)
    return serve_forever(server)


def cmd_chat(args) -> int:
    from llava_lite.serve.terminal import TerminalChat

    return TerminalChat(_load(args), image=args.image, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature).run()


def _model_args(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder or Llava folder (default: built-in model)")
    p.add_argument("--quantize", default="8bit" if defaults else None, choices=list(SERVE_QUANTIZE),
                   help="LLM quantization, or llamacpp-* to decode in llama.cpp (needs `make llamacpp`); "
                        "on a CPU, 8bit is int8-w8a8-prefill where the CPU has AVX512-VNNI and "
                        "int8-weight-only elsewhere (default: 8bit)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")


def _access_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("access (needed to serve beyond 127.0.0.1)")
    g.add_argument("--api-key", action="append", metavar="KEY", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (repeatable; also $LLAVA_LITE_API_KEY)")
    g.add_argument("--api-key-file", metavar="FILE", default=None, help="file of API keys, one per line")
    g.add_argument("--auth", action="append", metavar="USER:PASSWORD", default=None,
                   help="put the chat page behind a login (repeatable)")
    g.add_argument("--auth-file", metavar="FILE", default=None, help="file of USER:PASSWORD lines for the chat page")
    g.add_argument("--no-auth", action="store_const", const=True, default=None,
                   help="serve a non-loopback address with no authentication, on purpose")
    g = p.add_argument_group("per-client limits (per API key, or per address without keys)")
    g.add_argument("--rate-limit-rpm", type=int, default=None, help="requests per minute (default: 0, no limit)")
    g.add_argument("--rate-limit-concurrent", type=int, default=None,
                   help="chat completions in flight at once (default: 0, no limit)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="chat about images in the browser (Gradio) plus an OpenAI-compatible API",
                       description="Serve the chat page, POST /v1/chat/completions, GET /health and GET /metrics "
                                   "on one port. Settings come from --config (TOML, YAML or JSON), then --set, then "
                                   "flags.")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="serve config file (.toml/.yaml/.json): every setting below, plus [limits], [auth], "
                        "[rate_limit]")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any setting by dotted key, as in `llava-lite train` (e.g. limits.max_images=4); "
                        "applied after --config, before the flags below (repeatable)")
    _model_args(p, defaults=False)
    p.add_argument("--host", default=None, help="bind address (default: 127.0.0.1, local only)")
    p.add_argument("--port", type=int, default=None, help="port (default: 7860)")
    p.add_argument("--share", action="store_const", const=True, default=None,
                   help="create a public Gradio share link (off by default; needs authentication)")
    p.add_argument("--allow-local-files", action="append", metavar="DIR", default=None,
                   help="let the API read file:// image URLs under DIR (repeatable; off by default)")
    p.add_argument("--shutdown-grace-s", type=float, default=None,
                   help="on SIGTERM, seconds in-flight generations may take to finish (default: 30)")
    _access_args(p)
    _limit_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="chat about an image in the terminal",
                       description="Streamed multi-turn chat. Commands: /image PATH, /reset, /help, /quit.")
    _model_args(p)
    p.add_argument("--image", default=None, help="the image to talk about (or use /image PATH later)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per reply (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.set_defaults(func=cmd_chat)


def _limit_args(p: argparse.ArgumentParser) -> None:
    defaults = ServeLimits()
    helps = {
        "max_upload_mb": "largest upload in MB", "max_image_pixels": "largest image in pixels",
        "max_images": "images per conversation", "max_message_chars": "characters per user message",
        "max_new_tokens": "cap on tokens generated per reply",
        "concurrency": "conversations decoded at once, as one batch",
        "queue_size": "requests waiting beyond this are refused",
        "queue_timeout_s": "seconds a request may wait for a slot",
        "generation_timeout_s": "seconds before a generation is stopped",
        "prefill_group": "while others decode, new requests are prefilled in groups of up to this many "
                         "(1: never wait; torch backends, llama.cpp prefills each slot alone)",
        "prefill_wait_s": "seconds a new request may wait for its prefill group to fill",
    }
    g = p.add_argument_group("limits")
    for f in fields(ServeLimits):
        value = getattr(defaults, f.name)
        g.add_argument(f"--{f.name.replace('_', '-')}", type=type(value), default=None,
                       help=f"{helps[f.name]} (default: {value})")

