"""LLaVA-format data: reading, validating and encoding rows for training and evaluation.

A row is `{"id", "image" (path or list of paths, optional), "conversations": [{"from":
"human"|"gpt", "value"}]}`, as in LLaVA's JSON files. Rows come from JSON or JSONL files, or
from a Hugging Face `datasets` folder written by `save_to_disk`. Every problem is reported as
`file:index: reason` before any training step runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from llava_lite.images import ImageLoadError, load_image
from llava_lite.prompting import (
    ConversationError,
    SequenceTooLongError,
    TemplateMismatchError,
    check_turns,
    normalize_messages,
)


class DataValidationError(ValueError):
    """One or more rows are malformed; `problems` lists each as `file:index: reason`."""

    def __init__(self, problems: Sequence[str], total: int) -> None:
        self.problems = list(problems)
        shown = "\n  ".join(self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        super().__init__(
            f"{len(self.problems)} of {total} rows are bad (use --skip-bad to drop them):\n  {shown}{more}"
        )


@dataclass
class Row:
    """One conversation with its images (absolute paths) and where it came from."""

    id: str
    images: list[str]
    conversations: list[dict[str, str]]
    source: str  # "file:index", used in every error message
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class EncodedRow:
    row: Row
    input_ids: list[int]
    labels: list[int]


def _read_json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                yield lineno, DataRowError(f"not valid JSON ({err.msg})")
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataValidationError([f"{path}:line {err.lineno}: not valid JSON ({err.msg})"], 0) from None
    if not isinstance(data, list):
        raise DataValidationError([f"{path}: expected a JSON list of rows, got {type(data).__name__}"], 0)
    yield from enumerate(data)


class DataRowError(Exception):
    """A row that could not even be parsed (kept to be reported with the others)."""


def read_raw_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield (`file:index`, raw row) from a JSON/JSONL file or a `datasets.save_to_disk` folder."""
    path = Path(path)
    if path.is_dir():
        if not (path / "dataset_info.json").is_file() and not (path / "state.json").is_file():
            raise FileNotFoundError(f"{path}: folder is not a datasets.save_to_disk dataset")
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
        for index, raw in enumerate(dataset):
            yield f"{path}:{index}", raw
        return
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    if path.suffix not in (".json", ".jsonl"):
        raise DataValidationError([f"{path}: expected a .json or .jsonl file"], 0)
    for index, raw in _read_json_rows(path):
        yield f"{path}:{index}", raw


def parse_row(raw: Any, where: str, image_root: str | Path | None) -> Row:
    """Structural checks only (types, roles, turns); raises ConversationError with the reason."""
    if isinstance(raw, DataRowError):
        raise ConversationError(str(raw))
    if not isinstance(raw, dict):
        raise ConversationError(f"expected an object, got {type(raw).__name__}")
    convs = raw.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise ConversationError("missing or empty 'conversations' list")
    image = raw.get("image")
    if image is None or image == "":
        images: list[str] = []
    elif isinstance(image, str):
        images = [image]
    elif isinstance(image, list) and all(isinstance(i, str) and i for i in image):
        images = list(image)
    else:
        raise ConversationError(f"'image' must be a path or list of paths, got {image!r}")
    root = Path(image_root) if image_root else None
    images = [str(root / p) if root is not None and not Path(p).is_absolute() else p for p in images]
    messages = normalize_messages(convs)
    raw_id = raw.get("id", where)
    meta = {k: v for k, v in raw.items() if k not in ("id", "image", "conversations")}
    return Row(str(raw_id), images, messages, where, meta)


def check_row(row: Row, image_token: str, check_images: bool = True, loaded: set[str] | None = None) -> None:
    """Semantic checks: placeholders match images, turns alternate, images load (each path in
    `loaded` was already opened successfully and is not opened again)."""
    check_turns(row.conversations, image_token, for_training=True)
    placeholders = sum(m["content"].count(image_token) for m in row.conversations)
    if placeholders != len(row.images):
        if row.images and placeholders == 0:
            raise ConversationError(f"row has {len(row.images)} image(s) but no {image_token} placeholder")
        raise ConversationError(
            f"{placeholders} {image_token} placeholder(s) but {len(row.images)} image(s)"
        )
    if check_images:
        for path in row.images:
            if loaded is not None and path in loaded:
                continue
            load_image(path)
            if loaded is not None:
                loaded.add(path)


def load_rows(
    path: str | Path,
    image_root: str | Path | None = None,
    image_token: str = "<image>",
    check_images: bool = True,
    skip_bad: bool = False,
    limit: int | None = None,
    progress: bool = True,
) -> tuple[list[Row], list[str]]:
    """Read and validate every row. Returns (good rows, problems).

    Without `skip_bad`, any problem raises DataValidationError listing all of them.
    """
    rows: list[Row] = []
    problems: list[str] = []
    total = 0
    loaded: set[str] = set()
    source = read_raw_rows(path)
    for where, raw in tqdm(source, desc=f"checking {Path(path).name}", unit="row", disable=not progress,
                           leave=False):
        if limit is not None and total >= limit:
            break
        total += 1
        try:
            row = parse_row(raw, where, image_root)
            check_row(row, image_token, check_images, loaded)
        except (ConversationError, ImageLoadError) as err:
            problems.append(f"{where}: {err}")
            continue
        rows.append(row)
    if problems and not skip_bad:
        raise DataValidationError(problems, total)
    return rows, problems


def encode_rows(
    rows: Iterable[Row], processor, skip_bad: bool = False, progress: bool = True
) -> tuple[list[EncodedRow], list[str]]:
    """Tokenize rows with the model's chat template; rows whose answer would be truncated
    away (or that the template cannot supervise) are problems, reported as file:index."""
    encoded: list[EncodedRow] = []
    problems: list[str] = []
    rows = list(rows)
    for row in tqdm(rows, desc="tokenizing", unit="row", disable=not progress, leave=False):
        try:
            enc = processor.encode_training(row.conversations)
        except (SequenceTooLongError, ConversationError, TemplateMismatchError) as err:
            problems.append(f"{row.source}: {err}")
            continue
        if enc.num_images != len(row.images):
            # Truncation dropped a later turn holding an image placeholder; keep the
            # images that survived (they come first, in order).
            row = Row(row.id, row.images[: enc.num_images], row.conversations, row.source, row.meta)
        encoded.append(EncodedRow(row, enc.input_ids, enc.labels))
    if problems and not skip_bad:
        raise DataValidationError(problems, len(rows))
    return encoded, problems


def write_rows(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write LLaVA rows as JSON (a list) or JSONL, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    rows = list(rows)
    with open(tmp, "w", encoding="utf-8") as fh:
        if path.suffix == ".jsonl":
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            json.dump(rows, fh, ensure_ascii=False, indent=1)
    tmp.replace(path)
    return path
