"""Interoperability with transformers' `LlavaForConditionalGeneration` (the llava-hf layout).

Loading: a llava-hf folder becomes a CLIP tower, an `mlp2x_gelu` projector and a causal LM,
sharing the loaded tensors (no copies). Exporting: a model with a `clip` tower and an
`mlp2x_gelu` projector is written as a llava-hf folder that transformers loads as-is.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llava_lite.config import ConfigError, LlavaLiteConfig, LLMConfig, ProjectorConfig, VisionConfig
from llava_lite.llm import load_tokenizer
from llava_lite.lora import merged_copy
from llava_lite.projectors import MLP2xGeluProjector
from llava_lite.vision.clip import CLIPTower, image_processor_for

STRATEGY_TO_HF = {"patch": "default", "cls_patch": "full"}
HF_TO_STRATEGY = {v: k for k, v in STRATEGY_TO_HF.items()}


def _read_config(path: str | Path) -> dict | None:
    cfg = Path(path) / "config.json"
    if cfg.is_file():
        try:
            return json.loads(cfg.read_text())
        except json.JSONDecodeError:
            return None
    return None


def is_llava_hf(path: str | Path) -> bool:
    """True for a local llava-hf folder; a non-local id is assumed to be a Hub id."""
    data = _read_config(path)
    if data is not None:
        return data.get("model_type") == "llava"
    return not Path(path).exists() and "/" in str(path)


def llava_hf_config(path: str) -> LlavaLiteConfig:
    """The llava-lite config describing a llava-hf folder or Hub id."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(path)
    if hf.model_type != "llava":
        raise ConfigError(f"{path}: model_type is {hf.model_type!r}, not 'llava'")
    layer = hf.vision_feature_layer
    if not isinstance(layer, int):
        raise ConfigError(f"{path}: multi-layer vision features {layer} are not supported")
    strategy = hf.vision_feature_select_strategy
    if strategy not in HF_TO_STRATEGY:
        raise ConfigError(f"{path}: unknown vision_feature_select_strategy {strategy!r}")
    tok = load_tokenizer(path)
    image_token = tok.convert_ids_to_tokens(hf.image_token_id)
    return LlavaLiteConfig(
        vision=VisionConfig(name="clip", model_id=path, feature_layer=layer, feature_strategy=HF_TO_STRATEGY[strategy]),
        projector=ProjectorConfig(name="mlp2x_gelu"),
        llm=LLMConfig(model_id=path),
        image_token=image_token,
        max_length=getattr(hf.text_config, "max_position_embeddings", 2048),
        chat_content_format=detect_content_format(tok),
        llava_hf_path=path,
    ).validate()


def detect_content_format(tokenizer) -> str:
    """`string` if the chat template renders plain-text content, else `parts` (processor-style
    templates such as llava-hf's iterate over content parts)."""
    probe = [{"role": "user", "content": "llava-lite-probe"}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - any failure means plain strings are not accepted
        return "parts"
    return "string" if "llava-lite-probe" in text else "parts"


def load_llava_hf_parts(config: LlavaLiteConfig, dtype: torch.dtype = torch.float32):
    """(tower, projector, llm, tokenizer) sharing the tensors of a llava-hf model."""
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    path = config.llava_hf_path
    hf = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype)
    hcfg = hf.config
    if hcfg.projector_hidden_act != "gelu" or not getattr(hcfg, "multimodal_projector_bias", True):
        raise ConfigError(f"{path}: only a biased GELU projector maps to mlp2x_gelu")
    vision = hf.model.vision_tower
    tower = CLIPTower(vision, image_processor_for(vision.config, path),
                      config.vision.feature_layer, config.vision.feature_strategy)
    src = hf.model.multi_modal_projector
    projector = MLP2xGeluProjector(src.linear_1.in_features, src.linear_1.out_features)
    projector.load_state_dict(src.state_dict())
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(hcfg.text_config)
    # Causal LMs keep their decoder under `base_model_prefix` (e.g. `model` for Llama).
    setattr(llm, llm.base_model_prefix, hf.model.language_model)
    llm.lm_head = hf.lm_head
    leftover = [n for n, t in [*llm.named_parameters(), *llm.named_buffers()] if t.device.type == "meta"]
    if leftover:
        raise ConfigError(f"{path}: could not map the Llava language model onto a causal LM ({leftover[:3]})")
    llm.to(dtype)
    llm.eval()
    return tower, projector, llm, load_tokenizer(path)


def is_exportable(model) -> bool:
    """Whether `export_hf` can write this model: a `clip` tower and an `mlp2x_gelu` projector."""
    # the exact type: a subclass (ln_mlp2x_gelu) has weights LlavaMultiModalProjector has no
    # place for, and exporting it would silently drop them
    return isinstance(model.vision_tower, CLIPTower) and type(model.projector) is MLP2xGeluProjector


def export_hf(model, processor, out_dir: str | Path) -> Path:
    """Write `model` as a transformers `LlavaForConditionalGeneration` folder.

    LoRA is merged into a copy of the LLM. transformers looks the image token up in the
    embedding table, so when it lies past the vocabulary one row is added for it, and the
    generation config suppresses it so it is never sampled.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = model.config
    if not is_exportable(model):
        raise ValueError(
            f"export-hf needs a 'clip' tower and an 'mlp2x_gelu' projector; this model has "
            f"{config.vision.name!r} and {config.projector.name!r}"
        )
    out = Path(out_dir)
    llm = merged_copy(model.llm)
    image_token_id = processor.image_token_id
    vocab = llm.get_input_embeddings().num_embeddings
    if image_token_id >= vocab:
        llm.resize_token_embeddings(image_token_id + 1, mean_resizing=False)
        with torch.no_grad():
            llm.get_input_embeddings().weight[vocab:] = 0
    tower = model.vision_tower
    hcfg = LlavaConfig(
        vision_config=tower.model.config.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_id=image_token_id,
        vision_feature_layer=tower.feature_layer,
        vision_feature_select_strategy=STRATEGY_TO_HF[tower.strategy],
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        image_seq_length=tower.num_tokens,
        tie_word_embeddings=llm.config.tie_word_embeddings,
    )
    hf = LlavaForConditionalGeneration(hcfg)
    hf.model.vision_tower.load_state_dict(tower.model.state_dict())
    hf.model.multi_modal_projector.load_state_dict(model.projector.state_dict())
    hf.model.language_model.load_state_dict(llm.get_decoder().state_dict())
    hf.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
    hf.to(model.dtype)
    hf.generation_config.suppress_tokens = [image_token_id]
    hf.save_pretrained(out)
    llava_processor(processor, tower).save_pretrained(out)
    return out


def llava_processor(processor, tower):
    """The `LlavaProcessor` that expands `<image>` the way llava-lite does: CLIP's patch grid,
    plus the CLS token under the `full` strategy, and llava-lite's chat template."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=tower.image_processor, tokenizer=processor.tokenizer,
        patch_size=tower.model.config.patch_size,
        vision_feature_select_strategy=STRATEGY_TO_HF[tower.strategy],
        num_additional_image_tokens=1,  # CLIP's CLS, dropped again under "default"
        image_token=processor.config.image_token,
        chat_template=export_chat_template(processor.tokenizer.chat_template, processor.config),
    )


def export_chat_template(template: str, config: LlavaLiteConfig, image_text: str | None = None) -> str:
    """A processor-style template that renders what llava-lite renders.

    Engines and `apply_chat_template` pass content as parts ({"type": "image"}, {"type": "text"}).
    A tokenizer template that takes plain strings gets a prelude that joins the parts with
    newlines, an image becoming `image_text` (default: the image token; llama.cpp wants its media
    marker), as llava-lite's prompt builder does, and adds the configured system prompt; a
    template that already iterates over parts is kept as it is.
    """
    if config.chat_content_format == "parts":
        if config.system_prompt is not None:
            raise ConfigError("export-hf: a system prompt with a content-parts chat template is not supported")
        return template
    image = json.dumps(config.image_token if image_text is None else image_text)
    system = json.dumps(config.system_prompt)
    prelude = (
        "{%- set ns = namespace(messages=[]) -%}"
        "{%- for m in messages -%}"
        "{%- if m['content'] is string -%}{%- set text = m['content'] -%}"
        "{%- else -%}{%- set parts = namespace(text=[]) -%}"
        "{%- for p in m['content'] -%}"
        "{%- if p['type'] == 'text' -%}{%- set parts.text = parts.text + [p['text']] -%}"
        f"{{%- elif p['type'] in ['image', 'image_url'] -%}}{{%- set parts.text = parts.text + [{image}] -%}}"
        "{%- endif -%}{%- endfor -%}"
        "{%- set text = parts.text | join('\n') -%}{%- endif -%}"
        "{%- set ns.messages = ns.messages + [{'role': m['role'], 'content': text}] -%}"
        "{%- endfor -%}"
    )
    if config.system_prompt is not None:
        prelude += (
            "{%- if not ns.messages or ns.messages[0]['role'] != 'system' -%}"
            f"{{%- set ns.messages = [{{'role': 'system', 'content': {system}}}] + ns.messages -%}}"
            "{%- endif -%}"
        )
    return prelude + "{%- set messages = ns.messages -%}" + template
