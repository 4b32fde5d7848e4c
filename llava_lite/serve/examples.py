"""Example images with questions for the chat page: photos shipped inside scikit-image's
wheel and samples from the project's data (easy-VQA test images, a generated scene)."""

from __future__ import annotations

import logging
import random
from pathlib import Path

log = logging.getLogger("llava_lite.serve")


def _photo() -> list[dict]:
    """Real photos the default model handles (through the label bridge): a cat, a coffee cup."""
    try:
        import skimage
    except ImportError:  # scikit-image comes with the test extras (`make demo` installs them)
        return []
    folder = Path(skimage.__file__).parent / "data"
    asks = [("chelsea.png", "what is in this picture?"), ("coffee.png", "what's this?")]
    return [{"text": text, "files": [str(folder / name)]} for name, text in asks if (folder / name).is_file()]


def _easyvqa() -> list[dict]:
    try:
        from llava_lite.data.easyvqa import SHORT_ANSWER, image_paths
    except ImportError:  # easy-VQA is optional for serving
        return []
    paths = image_paths("test")
    return [
        {"text": f"{SHORT_ANSWER}\nWhat color is the shape?", "files": [paths[0]]},
        {"text": f"{SHORT_ANSWER}\nIs there a circle in the image?", "files": [paths[7]]},
        {"text": "What shape is in the image?", "files": [paths[3]]},
    ]


def _scene(cache_dir: Path) -> list[dict]:
    try:
        from llava_lite.data.scenes import caption, make_scene, render
    except ImportError:
        return []
    path = cache_dir / "scene-example.png"
    if not path.is_file():
        rng = random.Random(7)
        objects = make_scene(rng)
        cache_dir.mkdir(parents=True, exist_ok=True)
        render(objects, rng).save(path)
        log.debug("example scene: %s", caption(objects))
    return [{"text": "How many shapes are in the image?", "files": [str(path)]}]


def chat_examples(cache_dir: Path) -> list[dict]:
    """Examples in Gradio's multimodal form; sources that are not installed are skipped."""
    examples: list[dict] = []
    for source in (_easyvqa, _photo):
        try:
            examples += source()
        except Exception:  # noqa: BLE001 - examples are a nicety; never block serving
            log.warning("skipping examples from %s", source.__name__, exc_info=True)
    try:
        examples += _scene(cache_dir)
    except Exception:  # noqa: BLE001
        log.warning("skipping the generated scene example", exc_info=True)
    return examples
