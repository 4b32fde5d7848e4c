"""Configs validate with clear errors; the one image loader converts modes and rejects bad input."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from llava_lite.config import ConfigError, LlavaLiteConfig
from llava_lite.images import ImageLoadError, load_image


def test_config_round_trip(tmp_path):
    cfg = LlavaLiteConfig(system_prompt="Be brief.", max_length=512)
    cfg.lora.enabled = True
    cfg.save(tmp_path / "c.json")
    assert LlavaLiteConfig.load(tmp_path / "c.json") == cfg


@pytest.mark.parametrize(
    "data,match",
    [
        ({"vision": {"name": "resnet"}}, "not a registered tower"),
        ({"projector": {"name": "mlp3x"}}, "not a registered projector"),
        ({"vision": {"feature_strategy": "cls"}}, "feature_strategy"),
        ({"lora": {"r": 0}}, "lora needs"),
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"llm": {"model": "x"}}, r"unknown key 'llm.model'; known keys: \['model_id', 'trust_remote_code'\]"),
        ({"max_length": "2048"}, r"max_length: input should be a valid integer \(got '2048'\)"),
        ({"lora": {"target_modules": "q_proj"}}, "lora.target_modules: input should be a valid list"),
        ({"max_length": 3}, "too small"),
        ({"format_version": 99}, "newer"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, data, match):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=match):
        LlavaLiteConfig.load(path)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        LlavaLiteConfig.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        LlavaLiteConfig.load(tmp_path / "bad.json")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_modes_convert_to_rgb():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white background
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(Image.new("L", (3, 3), 128)).getpixel((1, 1)) == (128, 128, 128)
    assert load_image(Image.new("CMYK", (3, 3), (0, 0, 0, 0))).mode == "RGB"
    assert load_image(Image.new("P", (3, 3))).mode == "RGB"
    wide = Image.fromarray(np.full((3, 3), 65535, dtype=np.uint16))
    assert load_image(wide).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(np.zeros((5, 6, 3), dtype=np.float32)).size == (6, 5)
    assert load_image(np.ones((3, 5, 6), dtype=np.float32)).getpixel((0, 0)) == (255, 255, 255)  # CHW
    assert load_image(_png(Image.new("RGB", (2, 2), (1, 2, 3)))).getpixel((0, 0)) == (1, 2, 3)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert load_image(path).size == (20, 40)


def test_bad_images_are_rejected_clearly(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "nope.png")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(text)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(_png(Image.new("RGB", (64, 64), (9, 9, 9)))[:60])
    with pytest.raises(ImageLoadError, match=str(trunc)):
        load_image(trunc)
    with pytest.raises(ImageLoadError, match="exceeds the cap"):
        load_image(_png(Image.new("1", (5000, 5000))), max_pixels=1_000_000)
    with pytest.raises(ImageLoadError, match="cap"):
        load_image(text, max_file_bytes=2)
    with pytest.raises(ImageLoadError, match="NaN"):
        load_image(np.full((4, 4), np.nan))
    with pytest.raises(ImageLoadError, match="unsupported"):
        load_image(12)
