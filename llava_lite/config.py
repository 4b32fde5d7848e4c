"""Dataclass configs. A model's behaviour comes only from these, saved with every checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CONFIG_FORMAT_VERSION = 1


# `quantize` modes that decode the LLM in llama.cpp -> the GGUF storage of its matrices
LLAMACPP_MODES = {"llamacpp-f32": "f32", "llamacpp-f16": "f16", "llamacpp-q8_0": "q8_0"}

class ConfigError(ValueError):
    """A configuration file or value is invalid."""


@dataclass
class VisionConfig:
    """The frozen vision tower.

    name: registry key (`clip`, `efficientnet-lite0`).
    model_id: Hub id or local folder, for towers that load transformers weights.
    feature_layer: hidden-state index whose features are used (CLIP towers).
    feature_strategy: `patch` drops the CLS token, `cls_patch` keeps it (CNN towers prepend a
        global average-pooled token in its place).
    concat_blocks: indices of earlier blocks of a CNN tower whose feature maps, average-pooled
        to the output grid, are concatenated to each token's channels. They keep low-level cues
        (absolute colour and brightness) that the last layer is trained to discard.
    """

    name: str = "efficientnet-lite0"
    model_id: str | None = None
    feature_layer: int = -2
    feature_strategy: str = "patch"
    concat_blocks: list[int] = field(default_factory=list)


@dataclass
class ProjectorConfig:
    """Maps vision features to the LLM's embedding width. name: registry key."""

    name: str = "mlp2x_gelu"


@dataclass
class LLMConfig:
    """The causal language model: a packaged name (see `llava_lite.packaged`), Hub id or folder."""

    model_id: str = "smollm2-135m-instruct"
    trust_remote_code: bool = False


@dataclass
class LoraConfig:
    """LoRA on the LLM only (never the tower; the projector trains as a plain module)."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class LabelBridgeConfig:
    """How images outside the training domain reach the LLM (`llava_lite.label_bridge`).

    enabled: the checkpoint holds a fitted domain gate (`domain_gate.safetensors`); an image
        the gate puts outside the images the model was trained on is shown to the LLM as the
        tower head's top classes in words, not as projected patch tokens.
    confident: the head's top-1 probability from which the evidence says "confident".
    candidate_floor: classes below this probability are not offered as guesses.
    max_candidates: at most this many guesses.
    """

    enabled: bool = False
    confident: float = 0.75
    candidate_floor: float = 0.2
    max_candidates: int = 3


@dataclass
class LlavaLiteConfig:
    """Everything needed to rebuild a llava-lite model.

    image_token: the placeholder text that marks where an image goes in a message.
    max_length: context budget in tokens, image tokens included.
    system_prompt: used when a conversation has none; None keeps the template's own default.
    chat_content_format: `string` passes message content as text with inline placeholders;
        `parts` passes OpenAI-style content parts (what llava-hf processor templates expect).
    llava_hf_path: set when the tower, projector and LLM come from a transformers
        `LlavaForConditionalGeneration` folder.
    llm_subfolder: set when the checkpoint carries its own (e.g. merged) LLM weights.
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    label_bridge: LabelBridgeConfig = field(default_factory=LabelBridgeConfig)
    image_token: str = "<image>"
    max_length: int = 2048
    system_prompt: str | None = None
    chat_content_format: str = "string"
    llava_hf_path: str | None = None
    llm_subfolder: str | None = None
    format_version: int = CONFIG_FORMAT_VERSION

    def validate(self) -> LlavaLiteConfig:
        """Raise ConfigError naming the bad field; return self for chaining."""
        from llava_lite.registry import PROJECTORS, VISION_TOWERS

        if self.vision.name not in VISION_TOWERS:
            raise ConfigError(
                f"vision.name={self.vision.name!r} is not a registered tower; "
                f"choose one of {sorted(VISION_TOWERS)}"
            )
        if self.projector.name not in PROJECTORS:
            raise ConfigError(
                f"projector.name={self.projector.name!r} is not a registered projector; "
                f"choose one of {sorted(PROJECTORS)}"
            )
        if self.vision.feature_strategy not in ("patch", "cls_patch"):
            raise ConfigError(
                f"vision.feature_strategy={self.vision.feature_strategy!r}; use 'patch' or 'cls_patch'"
            )
        if self.chat_content_format not in ("string", "parts"):
            raise ConfigError(
                f"chat_content_format={self.chat_content_format!r}; use 'string' or 'parts'"
            )
        if self.max_length < 16:
            raise ConfigError(f"max_length={self.max_length} is too small (minimum 16)")
        if not self.image_token:
            raise ConfigError("image_token must be a non-empty string")
        lora = self.lora
        if lora.r <= 0 or lora.alpha <= 0 or not 0.0 <= lora.dropout < 1.0:
            raise ConfigError(f"lora needs r > 0, alpha > 0, 0 <= dropout < 1; got {lora}")
        if lora.enabled and not lora.target_modules:
            raise ConfigError("lora.enabled is set but lora.target_modules is empty")
        bridge = self.label_bridge
        if not 0 < bridge.candidate_floor <= bridge.confident <= 1 or bridge.max_candidates < 1:
            raise ConfigError(f"label_bridge needs 0 < candidate_floor <= confident <= 1 and max_candidates >= 1; "
                              f"got {bridge}")
        if self.format_version > CONFIG_FORMAT_VERSION:
            raise ConfigError(
                f"config format_version {self.format_version} is newer than this llava-lite "
                f"understands ({CONFIG_FORMAT_VERSION}); upgrade llava-lite"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> LlavaLiteConfig:
        """Build from a dict, rejecting unknown keys with the file they came from."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        nested = {"vision": VisionConfig, "projector": ProjectorConfig, "llm": LLMConfig, "lora": LoraConfig,
                  "label_bridge": LabelBridgeConfig}
        kwargs: dict[str, Any] = {}
        known = {f.name for f in fields(cls)}
        for key, value in data.items():
            if key not in known:
                raise ConfigError(f"{source}: unknown config key {key!r}; known keys: {sorted(known)}")
            if key in nested:
                kwargs[key] = _build_section(nested[key], value, f"{source}: {key}")
            else:
                kwargs[key] = value
        try:
            return cls(**kwargs).validate()
        except TypeError as err:
            raise ConfigError(f"{source}: {err}") from err

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LlavaLiteConfig:
        return cls.from_dict(read_json_config(path), source=str(path))


def read_json_config(path: str | Path) -> Any:
    """A JSON config file's contents; ConfigError naming the file if missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from err


def _build_section(section_cls: type, value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected an object, got {type(value).__name__}")
    known = {f.name for f in fields(section_cls)}
    unknown = set(value) - known
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known keys: {sorted(known)}")
    return section_cls(**value)
