"""Dataclass configs. A model's behaviour comes only from these, saved with every checkpoint.
Loading, validation style and overrides are `llava_lite.settings`'s, shared by every config."""

from __future__ import annotations

from dataclasses import dataclass, field

from llava_lite.settings import ConfigError, Settings

CONFIG_FORMAT_VERSION = 1


# `quantize` modes that decode the LLM in llama.cpp -> the GGUF storage of its matrices
LLAMACPP_MODES = {"llamacpp-f32": "f32", "llamacpp-f16": "f16", "llamacpp-q8_0": "q8_0"}

__all__ = ["CONFIG_FORMAT_VERSION", "LLAMACPP_MODES", "ConfigError", "LLMConfig", "LabelBridgeConfig",
           "LlavaLiteConfig", "LoraConfig", "ProjectorConfig", "VisionConfig"]


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
class LlavaLiteConfig(Settings):
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
