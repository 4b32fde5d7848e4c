"""llava-lite: a LLaVA-style visual assistant and the kit to build one."""

from llava_lite.api import LlavaLite
from llava_lite.config import (
    ConfigError,
    LlavaLiteConfig,
    LLMConfig,
    LoraConfig,
    ProjectorConfig,
    VisionConfig,
)
from llava_lite.images import ImageLoadError, load_image

__all__ = [
    "ConfigError",
    "ImageLoadError",
    "LLMConfig",
    "LlavaLite",
    "LlavaLiteConfig",
    "LoraConfig",
    "ProjectorConfig",
    "VisionConfig",
    "load_image",
]
__version__ = "0.1.0"
