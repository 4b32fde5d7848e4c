"""Sharded training on accelerate's FSDP2, and the full tensors a checkpoint needs from it.

A stage runs sharded when it is launched with an FSDP accelerate config
(`accelerate launch --config_file train/accelerate/fsdp.yaml -m llava_lite.cli train ...`).
accelerate then shards every parameter, frozen or trained, with the LLM's decoder layers as
the units, and the optimizer state and gradients with them. Checkpoints stay in the one
unsharded format every run writes, so they resume and load in any number of processes:
only the checkpointed weights (projector, LoRA, temperature) and their optimizer state are
gathered, never the frozen base.

accelerate 1.16 applies its FSDP plugin only on accelerators: a run of CPU processes (gloo)
gets MULTI_CPU and the FSDP config is silently dropped (accelerate/state.py). `configure`
puts the state on accelerate's own FSDP2 path there too, which is how CI tests it.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from llava_lite.config import ConfigError


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


DEEPSPEED_UNSUPPORTED = (
    "DeepSpeed is not supported by llava-lite's training step: its engine owns gradient accumulation, "
    "clipping and a partitioned optimizer state that the step and its checkpoints do not hand it. "
    "Shard with FSDP2 instead (accelerate launch --config_file train/accelerate/fsdp.yaml ...), "
    "which shards the same state as ZeRO-3; see train/deepspeed/README.md"
)


def configure(accelerator) -> None:
    """Honour an FSDP launch config that accelerate ignores on CPU; refuse DeepSpeed anywhere
    (on CPU accelerate would drop it silently, on a GPU the step would misuse its engine)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type == DistributedType.DEEPSPEED or _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise ConfigError(DEEPSPEED_UNSUPPORTED)
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    if not _env_flag("ACCELERATE_USE_FSDP"):
        return
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ConfigError(f"fsdp_version={plugin.fsdp_version}: llava-lite shards with FSDP2; "
                          "set fsdp_version: 2 in the accelerate config")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def is_sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    t = t.full_tensor() if isinstance(t, DTensor) else t
    return t.detach().contiguous().cpu()


def checkpoint_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """The names in a model's state dict that a llava-lite checkpoint holds: the projector and
    the LoRA weights."""
    return [k for k in state if k.startswith("projector.") or ".lora_" in k]


def gather_weights(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Full CPU copies of a sharded TrainModule's checkpointed tensors: (the projector and LoRA
    weights by their names in `module.model.state_dict()`, the contrastive temperature or None).
    A collective: every process calls it and gets the result."""
    state = module.model.state_dict()
    weights = {k: _full(state[k]) for k in checkpoint_keys(state)}
    scale = None if module.logit_scale is None else _full(module.logit_scale.log_scale)
    return weights, scale


def gather_optimizer_state(module: torch.nn.Module, optimizer) -> dict[str, Any]:
    """The optimizer's state as `optimizer.state_dict()` gives it for an unsharded model
    (parameters numbered in param-group order), gathered from the shards. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(module, _inner(optimizer),
                                    options=StateDictOptions(full_state_dict=True))
    numbered, groups, index = {}, [], 0
    for group in full["param_groups"]:
        ids = []
        for name in group["params"]:
            if name in full["state"]:
                numbered[index] = {k: _full(v) if torch.is_tensor(v) else v for k, v in full["state"][name].items()}
            ids.append(index)
            index += 1
        groups.append({**group, "params": ids})
    return {"state": numbered, "param_groups": groups}


def load_optimizer_state(module: torch.nn.Module, optimizer, state_dict: dict[str, Any]) -> None:
    """Load an unsharded (numbered) optimizer state into the sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # The parameters' names, in param-group order (FSDP2 keeps the module's own names).
    name_of = {id(p): name for name, p in module.named_parameters()}
    names = [name_of[id(p)] for group in _inner(optimizer).param_groups for p in group["params"]]
    if len(names) != sum(len(g["params"]) for g in state_dict["param_groups"]):
        raise ConfigError("checkpoint optimizer state does not match this stage's trainable parameters")
    groups = [{**saved, "params": [names[i] for i in saved["params"]]} for saved in state_dict["param_groups"]]
    state = {names[i]: slots for i, slots in state_dict["state"].items()}
    set_optimizer_state_dict(module, _inner(optimizer), {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
