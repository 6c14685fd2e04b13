"""Robust image decoding: every format and mode users have on disk becomes an RGB PIL image.

One function, :func:`load_image`, is used by training, evaluation, prediction and (later) serving,
so an image is decoded the same way everywhere. Decompression bombs raise instead of warning.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Extensions treated as images; anything else in a data folder is ignored silently.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)

# Never decode a truncated file silently: a half-grey image is a silent label-noise source.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# The limit is enforced explicitly in _refuse_bomb; Pillow's own warning would only be noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageDecodeError(ValueError):
    """The file could not be decoded as an image; the message says why."""


def is_image_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def load_image(source: str | Path | bytes | Image.Image, draft_size: int | None = None) -> Image.Image:
    """Decode ``source`` to an RGB image with EXIF orientation applied.

    Args:
        source: a path, raw encoded bytes, or an already opened PIL image.
        draft_size: when given, large JPEGs are decoded at reduced scale (never below this size)
            via Pillow's ``draft``; used by the fast integrity scan and by speed paths.

    Raises:
        ImageDecodeError: unreadable, truncated, empty, non-image or decompression-bomb input.

    Example:
        >>> img = load_image("photo.jpg")  # doctest: +SKIP
        >>> img.mode
        'RGB'
    """
    try:
        img = _open(source)
        _refuse_bomb(img)
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)  # animated GIF/WebP/TIFF: first frame
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"decompression bomb refused ({exc})") from None
    except ImageDecodeError:
        raise
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise ImageDecodeError(_describe(exc)) from None


def _refuse_bomb(img: Image.Image) -> None:
    """Pillow raises above twice MAX_IMAGE_PIXELS but only warns below; refuse both, from the
    header, before any pixel is decoded (an explicit check: warning filters are not thread-safe,
    and the integrity scan decodes in threads)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:
        raise ImageDecodeError(
            f"decompression bomb refused ({img.width}x{img.height} = {img.width * img.height} pixels "
            f"exceeds the limit of {limit})")


def _open(source: str | Path | bytes | Image.Image) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageDecodeError("empty input (0 bytes)")
        return Image.open(io.BytesIO(source))
    path = Path(source)
    if path.stat().st_size == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    return Image.open(path)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: 16-bit scaled (not clipped), alpha composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_bit_depth_to_rgb(img)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    elif img.mode.startswith("I;16") or arr.max(initial=0) > 255:
        scaled = arr / 257.0  # full 16-bit range onto 0..255, preserving relative intensity
    else:
        scaled = arr
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _describe(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    if "cannot identify image file" in text:
        return "not an image (unrecognised format)"
    if "truncated" in text.lower() or "premature end" in text.lower():
        return "truncated image file"
    return f"{type(exc).__name__}: {text}"
