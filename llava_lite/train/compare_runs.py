"""Are two run folders the same training? Every safetensors tensor is compared bitwise and every
JSON file by value, leaving out what differs between identical runs: timings (metrics.jsonl,
stage.json, summary.json, plots) and, with `--skip-rng`, the saved RNG state.

    python -m llava_lite.train.compare_runs runs/a runs/b

Exits 0 when they agree, 1 when they differ (each difference printed), 2 on a missing file.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

TIMING_FILES = {"metrics.jsonl", "stage.json", "summary.json"}


def compare_runs(a: Path, b: Path, skip_rng: bool = False) -> tuple[int, list[str]]:
    """(tensors compared, differences) between run folders `a` and `b`."""
    import torch
    from safetensors.torch import load_file

    compared, diffs = 0, []
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    for rel in files:
        if rel.name in TIMING_FILES or rel.suffix == ".png" or "tensorboard" in rel.parts:
            continue
        other = b / rel
        if not other.is_file():
            diffs.append(f"{rel}: missing in {b}")
        elif rel.suffix == ".safetensors":
            ta, tb = load_file(str(a / rel)), load_file(str(other))
            if ta.keys() != tb.keys():
                diffs.append(f"{rel}: tensor names differ")
                continue
            for key in ta:
                if skip_rng and key.startswith("rng."):
                    continue
                compared += 1
                if not torch.equal(ta[key], tb[key]):
                    diffs.append(f"{rel}: {key}")
        elif rel.suffix == ".json" and json.loads((a / rel).read_text()) != json.loads(other.read_text()):
            diffs.append(f"{rel}: contents differ")
    return compared, diffs


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path, help="a run folder (llava-lite train --output)")
    p.add_argument("b", type=Path, help="the run folder to compare it with")
    p.add_argument("--skip-rng", action="store_true", help="leave out the saved RNG state (rng.*)")
    args = p.parse_args(argv)
    for folder in (args.a, args.b):
        if not folder.is_dir():
            print(f"{folder}: not a folder")
            return 2
    compared, diffs = compare_runs(args.a, args.b, args.skip_rng)
    for line in diffs:
        print("DIFF", line)
    print(f"{compared} tensors compared, {len(diffs)} differences")
    return 1 if diffs else 0


if __name__ == "__main__":
    raise SystemExit(main())
