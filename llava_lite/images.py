"""The one image loader used everywhere: API, CLI, training and server."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = Union[Image.Image, str, os.PathLike, np.ndarray, bytes]  # noqa: UP007 - runtime alias

MAX_FILE_BYTES = 50 * 1024 * 1024
MAX_PIXELS = 64_000_000  # 8000 x 8000; larger is treated as a decompression bomb


class ImageLoadError(ValueError):
    """An input could not be turned into an RGB image; the message says which and why."""


def load_image(
    image: ImageInput,
    *,
    max_pixels: int = MAX_PIXELS,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> Image.Image:
    """Return an RGB PIL image from a PIL image, path, numpy array or encoded bytes.

    Handles RGBA/LA/P (composited on white), CMYK, 16-bit and grayscale modes, and applies
    EXIF orientation. Raises ImageLoadError for missing files, non-images, truncated files,
    files over `max_file_bytes` and images over `max_pixels`.
    """
    if isinstance(image, Image.Image):
        _check_pixels(image.size, max_pixels, "image")
        return _to_rgb(image, "image")
    if isinstance(image, np.ndarray):
        return _from_array(image, max_pixels)
    if isinstance(image, bytes):
        if len(image) > max_file_bytes:
            raise ImageLoadError(f"image bytes: {len(image)} bytes exceeds the {max_file_bytes}-byte cap")
        return _decode(io.BytesIO(image), "image bytes", max_pixels)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ImageLoadError(f"{path}: image file not found")
        size = path.stat().st_size
        if size > max_file_bytes:
            raise ImageLoadError(f"{path}: file is {size} bytes, over the {max_file_bytes}-byte cap")
        with open(path, "rb") as fh:
            return _decode(io.BytesIO(fh.read()), str(path), max_pixels)
    raise ImageLoadError(f"unsupported image input of type {type(image).__name__}")


def _decode(stream: io.BytesIO, name: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(stream)
            _check_pixels(img.size, max_pixels, name)
            img.load()
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(f"{name}: not an image file (format not recognised)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageLoadError(f"{name}: rejected as a decompression bomb ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(f"{name}: corrupt or truncated image ({err})") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block should not lose the image
        pass
    return _to_rgb(img, name)


def _check_pixels(size: tuple[int, int], max_pixels: int, name: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"{name}: image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageLoadError(
            f"{name}: {width}x{height} = {width * height} pixels exceeds the cap of {max_pixels}"
        )


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L"):
        arr = np.asarray(img, dtype=np.float64) / 257.0
        return _from_array(arr.astype(np.uint8), MAX_PIXELS, name)
    if mode in ("I", "F"):
        return _from_array(np.asarray(img, dtype=np.float64), MAX_PIXELS, name)
    try:
        return img.convert("RGB")
    except (OSError, ValueError) as err:
        raise ImageLoadError(f"{name}: cannot convert mode {mode} to RGB ({err})") from None


def _from_array(arr: np.ndarray, max_pixels: int, name: str = "array") -> Image.Image:
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ImageLoadError(f"{name}: expected HxW, HxWx3 or HxWx4, got shape {arr.shape}")
    _check_pixels((arr.shape[1], arr.shape[0]), max_pixels, name)
    if arr.dtype == np.uint8:
        out = arr
    else:
        a = arr.astype(np.float64)
        if not np.all(np.isfinite(a)):
            raise ImageLoadError(f"{name}: array contains NaN or infinity")
        if a.dtype.kind == "f" and a.min() >= 0.0 and a.max() <= 1.0 and arr.dtype.kind == "f":
            a = a * 255.0
        elif a.max() > 255.0:
            a = a / max(a.max(), 1.0) * 255.0  # 16-bit and other wide ranges
        out = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    img = Image.fromarray(out)
    return _to_rgb(img, name)
