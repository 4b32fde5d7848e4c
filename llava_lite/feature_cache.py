"""An on-disk cache of frozen vision-tower features, keyed by tower and image content.

The tower never trains, so its features for an image are computed once and reused across
epochs, stages and runs. Each image's features are one safetensors file named by a hash of
the image file's bytes, under a folder named for the tower's identity.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from llava_lite.config import VisionConfig
from llava_lite.images import load_image


def tower_key(config: VisionConfig) -> str:
    """A folder name identifying the tower and everything that changes its features."""
    # `concat` enters the key only when set, so caches written before it existed stay valid.
    ident = json.dumps(
        {"name": config.name, "model_id": config.model_id, "layer": config.feature_layer,
         "strategy": config.feature_strategy, **({"concat": config.concat_blocks} if config.concat_blocks else {})},
        sort_keys=True,
    )
    return f"{config.name}-{hashlib.sha1(ident.encode()).hexdigest()[:12]}"


def file_key(path: str | Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FeatureCache:
    """Features of one tower. `get` returns fp16 tensors of shape (tokens, hidden)."""

    def __init__(self, root: str | Path, config: VisionConfig, dtype: torch.dtype = torch.float16) -> None:
        self.dir = Path(root) / tower_key(config)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self._keys: dict[str, str] = {}
        self._memory: dict[str, torch.Tensor] = {}

    def _key(self, image_path: str) -> str:
        if image_path not in self._keys:
            self._keys[image_path] = file_key(image_path)
        return self._keys[image_path]

    def _file(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def missing(self, image_paths: Sequence[str]) -> list[str]:
        seen: set[str] = set()
        out = []
        for path in image_paths:
            key = self._key(path)
            if key not in seen and key not in self._memory and not self._file(key).is_file():
                out.append(path)
            seen.add(key)
        return out

    @torch.no_grad()
    def build(self, image_paths: Sequence[str], tower, batch_size: int = 32, progress: bool = True) -> int:
        """Compute and store features for images not cached yet; returns how many were computed.
        Each file is written to a temp name and renamed, so a crash leaves no half file."""
        todo = self.missing(image_paths)
        bar = tqdm(total=len(todo), desc="caching tower features", unit="img", disable=not progress or not todo)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            pixels = tower.preprocess([load_image(p) for p in chunk])
            feats = tower(pixels.to(tower.device)).to("cpu", self.dtype)
            for path, feat in zip(chunk, feats, strict=True):
                key = self._key(path)
                target = self._file(key)
                target.parent.mkdir(exist_ok=True)
                tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                save_file({"features": feat.contiguous()}, str(tmp))
                tmp.replace(target)
            bar.update(len(chunk))
        bar.close()
        return len(todo)

    def get(self, image_path: str) -> torch.Tensor:
        key = self._key(image_path)
        feat = self._memory.get(key)
        if feat is None:
            file = self._file(key)
            if not file.is_file():
                raise KeyError(f"{image_path}: features not cached (run build first)")
            feat = load_file(str(file))["features"]
            self._memory[key] = feat
        return feat

    def get_many(self, image_paths: Sequence[str]) -> torch.Tensor:
        return torch.stack([self.get(p) for p in image_paths])
