"""Robust image decoding: every format and mode users have on disk becomes an RGB PIL image.

One function, :func:`load_image`, is used by training, evaluation, prediction and serving, so
an image is decoded the same way everywhere (the decoding itself lives in
:mod:`visiontune.data.preprocess`, shared with the standalone clients). Failures become
:class:`ImageDecodeError` with a ``kind``; decompression bombs are refused from the header.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image, ImageFile

from ..core.errors import ImageDecodeError
from .preprocess import DecompressionBomb, decode

T = TypeVar("T")

# Extensions treated as images; anything else in a data folder is ignored silently.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)

# Never decode a truncated file silently: a half-grey image is a silent label-noise source.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# The limit is enforced explicitly (preprocess.open_image); Pillow's own warning would only be noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def is_image_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def load_image(source: str | Path | bytes | Image.Image, draft_size: int | None = None) -> Image.Image:
    """Decode ``source`` to an RGB image with EXIF orientation applied.

    Args:
        source: a path, raw encoded bytes, or an already opened PIL image.
        draft_size: when given, large JPEGs are decoded at reduced scale (never below this size)
            via Pillow's ``draft``; used by the fast integrity scan and by speed paths.

    Raises:
        ImageDecodeError: unreadable, truncated, empty, non-image or decompression-bomb input;
            its ``kind`` says which.

    Example:
        >>> img = load_image(Image.new("LA", (4, 4)))
        >>> img.mode, img.size
        ('RGB', (4, 4))
    """
    try:
        if isinstance(source, (bytes, bytearray)) and not source:
            raise ImageDecodeError("empty input (0 bytes)", kind="zero-size")
        if isinstance(source, (str, Path)) and Path(source).stat().st_size == 0:
            raise ImageDecodeError("empty file (0 bytes)", kind="zero-size")
        return decode(source, draft_size)
    except ImageDecodeError:
        raise
    except (DecompressionBomb, Image.DecompressionBombError) as exc:
        message = str(exc) if isinstance(exc, DecompressionBomb) else f"decompression bomb refused ({exc})"
        raise ImageDecodeError(message, kind="decompression-bomb") from None
    except FileNotFoundError:
        raise ImageDecodeError("file not found", kind="missing") from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise _describe(exc) from None


def _describe(exc: Exception) -> ImageDecodeError:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, Image.UnidentifiedImageError) or "cannot identify image file" in text:
        return ImageDecodeError("not an image (unrecognised format)", kind="non-image")
    if "truncated" in text.lower() or "premature end" in text.lower():
        return ImageDecodeError("truncated image file", kind="truncated")
    if isinstance(exc, OSError) and exc.strerror:
        return ImageDecodeError(f"unreadable: {exc.strerror}", kind="unreadable")
    return ImageDecodeError(f"{type(exc).__name__}: {text}", kind="unreadable")


def try_load(source: str | Path | bytes | Image.Image, draft_size: int | None = None) -> Image.Image | None:
    """:func:`load_image`, or None for an image that cannot be read: the one bad-image policy of
    every step that shows or measures a sample of images (report galleries and overlays, Grad-CAM,
    hashes, parity batches, in-memory caches, timing). Such a step skips the image; the steps that
    must account for every input (the scan before training, prediction rows, the server) record
    the :class:`~visiontune.core.errors.ImageDecodeError` instead, and the scan writes it to
    ``RUN/skipped.txt``, so a file skipped here was reported there.

    Example:
        >>> try_load(b"not an image") is None
        True
    """
    try:
        return load_image(source, draft_size)
    except ImageDecodeError:
        return None


def readable(items: Iterable[T], path_of: Callable[[T], Any] | None = None,
             draft_size: int | None = None) -> Iterator[tuple[T, Image.Image]]:
    """``(item, image)`` for each of ``items`` whose image (the item itself, or ``path_of(item)``)
    can be read, in order: :func:`try_load` over a sample.

    Example:
        >>> [item for item, _ in readable([b"junk", Image.new("RGB", (2, 2))])][0].size
        (2, 2)
    """
    for item in items:
        image = try_load(item if path_of is None else path_of(item), draft_size)
        if image is not None:
            yield item, image
