"""Frozen vision towers, each registered under an exact name in VISION_TOWERS."""

from llava_lite.vision import clip, efficientnet  # noqa: F401  (registers the towers)
from llava_lite.vision.base import VisionTower

__all__ = ["VisionTower"]
