"""`llava-lite`: the one command-line door. Library subcommands live here; `train` and `serve`
plug in through the `llava_lite.commands` entry-point group, so this package never imports
them."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

from llava_lite.config import LLAMACPP_MODES

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint folder, transformers Llava folder or Hub id (default: the built-in model)")
    p.add_argument("--quantize", default="none",
                   choices=["none", "8bit", "4bit", "int8-w8a8-prefill", "int8-weight-only", *LLAMACPP_MODES],
                   help="quantize the LLM for inference, or decode it in llama.cpp (llamacpp-*: needs "
                        "llama-cpp-python, `make llamacpp`). On a CPU, 8bit is int8-w8a8-prefill where the "
                        "CPU has AVX512-VNNI (int8 activations in prefills, faster first tokens) and "
                        "int8-weight-only elsewhere (default: none)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype (default: fp32)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="generation length cap (default: 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    p.add_argument("--no-stream", action="store_true", help="print the answer at the end instead of streaming")


def _load(args):
    from llava_lite import LlavaLite

    t0 = time.perf_counter()
    model = LlavaLite.from_pretrained(args.model, quantize=args.quantize, dtype=args.dtype)
    print(f"[llava-lite] loaded {model.source} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return model


def _answer(model, image: str, question: str, args) -> int:
    gen = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    t0 = time.perf_counter()
    if args.no_stream:
        print(model.ask(image, question, **gen))
    else:
        first = None
        for chunk in model.ask(image, question, stream=True, **gen):
            first = first or time.perf_counter()
            print(chunk, end="", flush=True)
        print()
        if first is not None:
            print(f"[llava-lite] first token {first - t0:.2f}s, total {time.perf_counter() - t0:.2f}s",
                  file=sys.stderr)
    return 0


def cmd_ask(args) -> int:
    return _answer(_load(args), args.image, args.question, args)


def cmd_caption(args) -> int:
    from llava_lite.api import CAPTION_PROMPT

    return _answer(_load(args), args.image, args.prompt or CAPTION_PROMPT, args)


def cmd_export_hf(args) -> int:
    from llava_lite import LlavaLite
    from llava_lite.hf_interop import export_hf

    model = LlavaLite.from_pretrained(args.model)
    out = export_hf(model.model, model.processor, args.out)
    print(f"wrote transformers LlavaForConditionalGeneration folder: {out}")
    return 0


def cmd_export_gguf(args) -> int:
    from llava_lite import LlavaLite
    from llava_lite.gguf_export import export_gguf
    from llava_lite.gguf_mmproj import mmproj_caveat

    model = LlavaLite.from_pretrained(args.model)
    paths = export_gguf(model.model, model.processor, args.out, type_name=args.type, llm_only=args.llm_only)
    for part, path in paths.items():
        print(f"wrote {part}: {path}")
    caveat = mmproj_caveat(model.model) if "mmproj" in paths else None
    if caveat:
        print(f"note: {caveat}")
    if "mmproj" in paths:
        print(f"run: llama-mtmd-cli -m {paths['llm']} --mmproj {paths['mmproj']} --image IMAGE -p 'What is this?'")
    return 0


def cmd_info(args) -> int:
    from llava_lite import LlavaLite

    model = LlavaLite.from_pretrained(args.model)
    params = sum(p.numel() for p in model.model.parameters())
    trainable = sum(p.numel() for p in model.model.parameters() if p.requires_grad)
    print(json.dumps({"source": model.source, "config": model.config.to_dict(),
                      "parameters": params, "trainable": trainable,
                      "image_tokens": model.processor.num_image_tokens}, indent=2))
    return 0


def _dual_encoder(args):
    from llava_lite.dual_encoder import load_dual_encoder

    return load_dual_encoder(args.model)


def cmd_zeroshot(args) -> int:
    from llava_lite.zero_shot import DEFAULT_TEMPLATES, zero_shot_classify

    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    if len(classes) < 2:
        raise ValueError("--classes needs at least two comma-separated class names")
    result = zero_shot_classify(_dual_encoder(args), args.images, classes, args.template or DEFAULT_TEMPLATES)
    for path, label, probs in zip(args.images, result.labels, result.probs.tolist(), strict=True):
        top = sorted(zip(classes, probs, strict=True), key=lambda x: -x[1])[:3]
        if args.json:
            print(json.dumps({"image": path, "label": label, "probs": dict(zip(classes, probs, strict=True))}))
        else:
            print(f"{path}\t{label}\t" + ", ".join(f"{c} {p:.1%}" for c, p in top))
    return 0


def cmd_retrieve(args) -> int:
    from llava_lite.zero_shot import retrieve

    gallery = args.gallery
    if len(gallery) == 1 and os.path.isdir(gallery[0]):
        exts = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
        gallery = sorted(str(p) for p in Path(gallery[0]).iterdir() if p.suffix.lower() in exts)
    if not gallery:
        raise ValueError("the gallery is empty")
    hits = retrieve(_dual_encoder(args), args.query, gallery, k=args.k)
    for query, row in zip(args.query, hits, strict=True):
        print(f"query: {query}")
        for rank, (i, score) in enumerate(row, 1):
            print(f"  {rank}. {score:.3f}  {gallery[i]}")
    return 0


def cmd_bench(args) -> int:
    from llava_lite.benchmark import cmd_bench as run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llava-lite",
        description="llava-lite: chat with images, ask and caption, train and serve LLaVA-style models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_model_commands(sub)
    _add_dual_encoder_commands(sub)
    for ep in entry_points(group="llava_lite.commands"):
        register = ep.load()
        register(sub)
    return parser


def _add_model_commands(sub) -> None:
    p = sub.add_parser("ask", help="answer a question about an image")
    p.add_argument("image", help="image file")
    p.add_argument("question", help="the question")
    _add_model_args(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("caption", help="describe an image")
    p.add_argument("image", help="image file")
    p.add_argument("--prompt", default=None, help="override the caption instruction")
    _add_model_args(p)
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("export-hf", help="write a transformers LlavaForConditionalGeneration folder")
    p.add_argument("--model", required=True, help="llava-lite checkpoint with a clip tower and mlp2x_gelu projector")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("export-gguf", help="write llama.cpp GGUF files: the LLM and, for CLIP/SigLIP towers, an mmproj",
                       description="Writes <out>/llm-<type>.gguf and <out>/mmproj-<type>.gguf (LoRA merged first), "
                                   "which llama.cpp's llama-mtmd-cli, llama-server and llama-cpp-python load as is.")
    p.add_argument("--model", default=None, help="checkpoint (default: the built-in model)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--type", default="f16", choices=["f32", "f16", "q8_0"],
                   help="storage of 2-D weights (norms stay f32; default: %(default)s)")
    p.add_argument("--llm-only", action="store_true",
                   help="write the language model alone (needed for towers llama.cpp cannot run, e.g. EfficientNet)")
    p.set_defaults(func=cmd_export_gguf)

    p = sub.add_parser("info", help="print a model's config and parameter counts")
    p.add_argument("--model", default=None, help="checkpoint (default: the built-in model)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="speed and memory per precision, against transformers and the bandwidth bound",
                       description="Runs each variant in its own process and prints a table (or JSON); "
                                   "--out also writes bench.json, bench.md and bench.png.")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the built-in model)")
    p.add_argument("--quantize", default="fp32,bf16,8bit,4bit",
                   help="comma-separated variants: fp32, bf16, 8bit, 4bit, or a backend (int8-w8a8-prefill, "
                        "int8-weight-only, dynamic-int8, bnb-8bit, bnb-4bit, torchao-int8, "
                        "torchao-int8-weight-only), or the llama.cpp decoder (llamacpp-f32, llamacpp-q8_0) "
                        "(default: fp32,bf16,8bit,4bit)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per timing (default: 64)")
    p.add_argument("--repeats", type=int, default=3, help="timings per figure, best kept (default: 3)")
    p.add_argument("--batch-sizes", default="1,4,8", help="batched-throughput sizes (default: 1,4,8)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    p.add_argument("--out", default=None, help="also write bench.json/md/png here")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=cmd_bench)


def _add_dual_encoder_commands(sub) -> None:
    p = sub.add_parser("zeroshot", help="classify images among class names with a dual encoder (CLIP-style)",
                       description="Zero-shot classification with prompt ensembling.")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--model", required=True, help="a dual encoder folder (llava-lite train --recipe clip-demo), "
                   "a transformers CLIPModel folder, or label-space (no training: the tower's ImageNet head "
                   "bridged to MiniLM text embeddings)")
    p.add_argument("--classes", required=True, help="comma-separated class names, e.g. 'cat,dog,car'")
    p.add_argument("--template", action="append", default=None,
                   help="prompt template with {} (repeatable; default: an ensemble of 6)")
    p.add_argument("--json", action="store_true", help="one JSON line per image")
    p.set_defaults(func=cmd_zeroshot)

    p = sub.add_parser("retrieve", help="text-to-image or image-to-text retrieval with a dual encoder",
                       description="Text queries search an image gallery; image queries search a text gallery.")
    p.add_argument("--model", required=True, help="a dual encoder folder, a transformers CLIPModel folder, "
                   "or label-space")
    p.add_argument("--query", action="append", required=True, help="a text, or an image file (repeatable)")
    p.add_argument("--gallery", nargs="+", required=True,
                   help="image files or one folder of images (for text queries), or texts (for image queries)")
    p.add_argument("-k", type=int, default=5, help="results per query (default: 5)")
    p.set_defaults(func=cmd_retrieve)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from llava_lite.images import ImageLoadError
    from llava_lite.prompting import ConversationError, SequenceTooLongError

    try:
        return int(args.func(args) or 0)
    except (ImageLoadError, ConversationError, SequenceTooLongError, FileNotFoundError, ValueError) as err:
        print(f"llava-lite: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nllava-lite: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
