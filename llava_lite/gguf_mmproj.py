"""A CLIP or SigLIP tower and `mlp2x_gelu` projector as a llama.cpp `mmproj` GGUF (libmtmd,
projector type "mlp", the LLaVA-1.5 graph).

What that graph computes, and so what can be exported: the ViT up to the feature layer (no
post-layernorm, no pooling head), CLS dropped, then linear -> GELU -> linear. A tower or
projector that computes anything else is refused with the reason, rather than written as a
file that loads and answers differently.

Known llama.cpp defect (ggml-org/llama.cpp#25814, fix proposed in #25844): its llava graph
appends CLS after the patches while still reading positions and patches CLS-first, so a CLIP
tower (which has CLS) is run with shifted position embeddings and its CLS output replaces
patch 0. The file is written in the standard layout, as published LLaVA-1.5 mmproj files are,
so it is right once that fix lands; SigLIP towers (no CLS) are unaffected and match exactly.
"""

from __future__ import annotations

from pathlib import Path

from llava_lite.config import ConfigError
from llava_lite.gguf_llm import OutType, encode_tensor, finish, new_writer

# ViT activation (config.hidden_act) -> the mmproj flag that selects it; quick_gelu is the
# default. ggml's GELU is the tanh form, exact for SigLIP and within ~1e-3 of erf GELU.
ACTIVATIONS = {"quick_gelu": None, "gelu_pytorch_tanh": "use_gelu", "gelu": "use_gelu"}
TOWER_TYPES = ("clip_vision_model", "siglip_vision_model")
CLS_DEFECT = ("llama.cpp's llava graph misplaces CLIP's CLS token (ggml-org/llama.cpp#25814): builds "
              "without the fix (#25844) shift this tower's position embeddings and drop patch 0")


def mmproj_refusal(model) -> str | None:
    """Why `model`'s vision side has no mmproj form, or None when it has one."""
    from llava_lite.projectors import MLP2xGeluProjector
    from llava_lite.vision.clip import CLIPTower

    tower, projector = model.vision_tower, model.projector
    if not isinstance(tower, CLIPTower):
        return (f"the {model.config.vision.name!r} vision tower has no graph in llama.cpp's mmproj format "
                "(libmtmd runs CLIP/SigLIP-style ViTs only), so only the language model can be exported")
    if tower.model.config.model_type not in TOWER_TYPES:
        return f"the mmproj 'mlp' graph runs {TOWER_TYPES}; this tower is {tower.model.config.model_type!r}"
    if tower.has_cls and tower.strategy != "patch":
        return (f"the mmproj 'mlp' graph drops CLS (LLaVA's 'default' strategy); this model uses "
                f"{tower.strategy!r}")
    if type(projector) is not MLP2xGeluProjector:
        return (f"the mmproj 'mlp' graph is linear -> GELU -> linear (mlp2x_gelu); this model's projector is "
                f"{model.config.projector.name!r}")
    if tower.model.config.hidden_act not in ACTIVATIONS:
        return f"CLIP activation {tower.model.config.hidden_act!r} has no mmproj equivalent"
    return None


def mmproj_caveat(model) -> str | None:
    """What a user should know before serving this model's mmproj with llama.cpp, if anything."""
    return CLS_DEFECT if getattr(model.vision_tower, "has_cls", False) else None


def feature_block(tower) -> int:
    """The number of encoder layers whose output is the feature (llama.cpp's feature_layer)."""
    n = tower.model.config.num_hidden_layers
    layer = tower.feature_layer
    # hidden_states has n + 1 entries: the embeddings, then each layer's output
    block = layer if layer >= 0 else n + 1 + layer
    if not 1 <= block <= n:
        raise ConfigError(f"export-gguf: feature layer {layer} is outside the tower's {n} layers")
    return block


def write_mmproj_gguf(model, path: str | Path, out: OutType, text_dim: int, name: str = "llava-lite") -> Path:
    """Write the vision tower and projector of `model` as an mmproj GGUF."""
    import gguf

    why = mmproj_refusal(model)
    if why is not None:
        raise ConfigError(f"export-gguf: no mmproj: {why}")
    tower = model.vision_tower
    path = Path(path)
    writer = new_writer(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(name)
    writer.add_file_type(getattr(gguf.LlamaFileType, out.file_type))
    _add_vision_hparams(writer, tower, text_dim)
    _add_vision_weights(writer, tower, model.projector, out)
    finish(writer, path)
    return path


def _add_vision_hparams(writer, tower, text_dim: int) -> None:
    cfg = tower.model.config
    processor = tower.image_processor
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type("mlp")
    writer.add_vision_projection_dim(text_dim)
    writer.add_vision_image_size(cfg.image_size)
    writer.add_vision_patch_size(cfg.patch_size)
    writer.add_vision_embedding_length(cfg.hidden_size)
    writer.add_vision_feed_forward_length(cfg.intermediate_size)
    writer.add_vision_block_count(cfg.num_hidden_layers)
    writer.add_vision_head_count(cfg.num_attention_heads)
    writer.add_vision_attention_layernorm_eps(cfg.layer_norm_eps)
    writer.add_vision_image_mean(list(processor.image_mean))
    writer.add_vision_image_std(list(processor.image_std))
    if ACTIVATIONS[cfg.hidden_act] == "use_gelu":
        writer.add_vision_use_gelu(True)
    block = feature_block(tower)
    if block != cfg.num_hidden_layers - 1:  # the graph's default is the second-to-last layer
        writer.add_array("clip.vision.feature_layer", [block])


def _add_vision_weights(writer, tower, projector, out: OutType) -> None:
    import gguf

    n_layers = tower.model.config.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, n_layers)
    for hf_name, tensor in tower.model.state_dict().items():
        name = hf_name.removeprefix("vision_model.")
        if name.startswith(("post_layernorm.", "head.")) or name.endswith("position_ids"):
            continue  # features come before the post-layernorm and SigLIP's pooling head
        # llava-hf names (vision_tower.vision_model.*), which gguf's name map knows
        key = "vision_tower.vision_model." + name
        gg_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gg_name is None:
            raise ConfigError(f"export-gguf: no mmproj name for tower tensor {hf_name!r}")
        # the patch convolution runs as im2col + matmul in f16 or f32, never quantized
        data, raw = encode_tensor(tensor.detach().float().numpy(), out, force_float="patch_embd" in gg_name)
        writer.add_tensor(gg_name, data, raw_dtype=raw)
    mm = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ]
    for index, linear in ((0, projector.linear_1), (2, projector.linear_2)):
        for part in ("weight", "bias"):
            data, raw = encode_tensor(getattr(linear, part).detach().float().numpy(), out)
            writer.add_tensor(f"{mm.format(bid=index)}.{part}", data, raw_dtype=raw)
