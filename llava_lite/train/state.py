"""Training state on disk: model weights, optimizer, scheduler, RNG and data position.

Everything is safetensors or JSON (nothing is unpickled). A checkpoint is written to a temp
folder and renamed into place, so a crash at any moment leaves only complete checkpoints;
the newest `keep_last` are kept.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llava_lite.atomic import atomic_dir

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
MODEL_DIR = "model"


def _optimizer_tensors(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, slots in sd["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save_train_state(
    ckpt_root: Path, step: int, save_model: Callable[[Path], None], optimizer_state: dict[str, Any], scheduler,
    extra: dict[str, Any], keep_last: int, extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """One checkpoint: the model (written by `save_model` into the folder it is given), an
    unsharded `optimizer.state_dict()`, the scheduler, RNG and data position."""
    final = ckpt_root / f"step-{step:07d}"
    with atomic_dir(final) as tmp:
        save_model(tmp / MODEL_DIR)
        tensors, optim_meta = _optimizer_tensors(optimizer_state)
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, state in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = state
        for key, value in (extra_tensors or {}).items():
            tensors[f"extra.{key}"] = value.detach().contiguous().cpu()
        save_file(tensors, str(tmp / STATE_TENSORS))
        meta = {
            "step": step,
            "optimizer": optim_meta,
            "scheduler": scheduler.state_dict(),
            "python_random": _jsonable(random.getstate()),
            **extra,
        }
        (tmp / STATE_JSON).write_text(json.dumps(meta))
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _tuplify(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp folders from a crash are ignored)."""
    if not ckpt_root.is_dir():
        return []
    done = [p for p in ckpt_root.iterdir()
            if p.is_dir() and p.name.startswith("step-") and (p / STATE_JSON).is_file()]
    return sorted(done, key=lambda p: p.name)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def clean_partial(ckpt_root: Path) -> None:
    """Remove temp folders a killed run left behind."""
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)


def load_train_state(ckpt: Path, load_optimizer: Callable[[dict[str, Any]], None], scheduler) -> dict[str, Any]:
    """Restore optimizer (through `load_optimizer`, given an unsharded state dict), scheduler and
    RNG; return the metadata."""
    meta = json.loads((ckpt / STATE_JSON).read_text())
    tensors = load_file(str(ckpt / STATE_TENSORS))
    sd = {"state": {}, "param_groups": meta["optimizer"]["param_groups"]}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, slot = key.split(".", 2)
            sd["state"].setdefault(int(idx), {})[slot] = value
    for key, value in meta["optimizer"]["scalars"].items():
        idx, slot = key.split(".", 1)
        sd["state"].setdefault(int(idx), {})[slot] = value
    load_optimizer(sd)
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states)
    random.setstate(_tuplify(meta["python_random"]))
    return meta


def read_extra_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """The extra tensors a checkpoint holds beside the model (e.g. the contrastive temperature),
    read without loading its optimizer state."""
    with safe_open(str(ckpt / STATE_TENSORS), framework="pt") as f:
        return {k.removeprefix("extra."): f.get_tensor(k) for k in f.keys() if k.startswith("extra.")}
