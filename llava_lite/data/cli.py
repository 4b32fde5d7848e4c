"""`llava-lite data`: convert public datasets, build the named sets, check a file."""

from __future__ import annotations

import argparse
import sys


def cmd_convert(args) -> int:
    from llava_lite.data.converters import convert

    kwargs = {"limit": args.limit}
    if args.format == "coco-captions":
        kwargs.update(image_prefix=args.image_prefix, all_captions=not args.first_caption_only)
    report = convert(args.format, args.input, args.output, **kwargs)
    for problem in report.problems[:20]:
        print(f"bad row: {problem}", file=sys.stderr)
    if len(report.problems) > 20:
        print(f"... and {len(report.problems) - 20} more bad rows", file=sys.stderr)
    print(f"{report.summary()} -> {args.output}")
    return 0


def cmd_build(args) -> int:
    from llava_lite.data.builders import build_train_set
    from llava_lite.packaged import cache_dir

    for name in args.names:
        print(build_train_set(name, args.root or cache_dir() / "data"))
    return 0


def cmd_check(args) -> int:
    from llava_lite.llava_data import load_rows

    rows, problems = load_rows(args.file, args.image_root, skip_bad=True, check_images=not args.no_images)
    for problem in problems:
        print(problem)
    print(f"{args.file}: {len(rows)} good rows, {len(problems)} bad", file=sys.stderr)
    return 1 if problems else 0


def register(sub: argparse._SubParsersAction) -> None:
    from llava_lite.data.builders import TRAIN_SETS
    from llava_lite.data.converters import CONVERTERS

    p = sub.add_parser("data", help="convert, build or check training data")
    dsub = p.add_subparsers(dest="data_command", metavar="COMMAND")
    c = dsub.add_parser("convert", help="convert LCS-558K, LLaVA-Instruct/mix665k or COCO captions to LLaVA JSONL")
    c.add_argument("format", choices=sorted(CONVERTERS), help="input format")
    c.add_argument("input", help="input file (JSON)")
    c.add_argument("output", help="output file (.json or .jsonl)")
    c.add_argument("--limit", type=int, default=None, help="convert at most N rows")
    c.add_argument("--image-prefix", default="", help="coco-captions: prefix joined to file_name (e.g. train2017/)")
    c.add_argument("--first-caption-only", action="store_true", help="coco-captions: one row per image")
    c.set_defaults(func=cmd_convert)
    b = dsub.add_parser("build", help="write a named training set (easy-VQA, scenes) as LLaVA JSON")
    b.add_argument("names", nargs="+", choices=sorted(TRAIN_SETS), help="set name(s)")
    b.add_argument("--root", default=None, help="output folder (default: $LLAVA_LITE_CACHE/data)")
    b.set_defaults(func=cmd_build)
    k = dsub.add_parser("check", help="validate a LLaVA JSON/JSONL file; prints file:index: reason per bad row")
    k.add_argument("file", help="data file or datasets.save_to_disk folder")
    k.add_argument("--image-root", default=None, help="folder relative image paths are under")
    k.add_argument("--no-images", action="store_true", help="skip opening the images")
    k.set_defaults(func=cmd_check)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
