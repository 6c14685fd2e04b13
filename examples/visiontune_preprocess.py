"""Preprocessing, defined once: the spec saved with every model and the pixels it implies.

Pure Python, numpy and Pillow, with no visiontune import: ``examples/visiontune_preprocess.py``
is a byte-identical copy (``tests/test_examples.py`` checks it, and that both give the same
pixels in every resize mode), so a standalone client reproduces the package's input exactly.

The spec travels with every model (``model.json``, ONNX metadata)::

    {"input_size": [3, 224, 224], "mean": [...], "std": [...], "interpolation": "bicubic",
     "crop_pct": 0.875, "resize_mode": "crop", "jpeg_draft": true}

Evaluation pixels: decode (large JPEGs at reduced scale via ``draft``, never below what the
resize needs), EXIF orientation, RGB (alpha composited on white, 16-bit scaled), then

- ``crop``: shorter side to ``int(size / crop_pct)``, centre crop (torchvision's rounding);
- ``letterbox``: longer side to fit, pad with the mean colour (normalises to zero);
- ``squash``: resize to the input size, ignoring the aspect ratio;

and finally scale to 0..1 and normalise with mean/std into a float32 CHW array.

Example:
    >>> from PIL import Image
    >>> spec = Preprocessing.from_dict({"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3})
    >>> preprocess(Image.new("RGB", (50, 40), (255, 0, 0)), spec)[:, 0, 0].tolist()
    [1.0, -1.0, -1.0]
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

RESIZE_MODES = ("crop", "letterbox", "squash")
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}
DEFAULT_CROP_PCT = 0.875
MIN_CROP_PCT = 0.5  # below this, the resize target grows past twice the input: never a real config
MIN_SIDE, MAX_SIDE = 8, 2048
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class DecompressionBomb(ValueError):
    """The image header declares more pixels than ``Image.MAX_IMAGE_PIXELS``."""


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input; validated whenever it is built from a dict."""

    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    crop_pct: float = DEFAULT_CROP_PCT
    resize_mode: str = "crop"
    jpeg_draft: bool = True

    @property
    def height(self) -> int:
        return self.input_size[1]

    @property
    def width(self) -> int:
        return self.input_size[2]

    def with_size(self, size: int) -> Preprocessing:
        """The same spec at a square input of ``size`` pixels."""
        return replace(self, input_size=(3, int(size), int(size)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists, not tuples), the form stored in model.json."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Any) -> Preprocessing:
        """Build and validate; raise ValueError naming the first bad field."""
        if not isinstance(values, dict):
            raise ValueError(f"preprocessing must be a mapping, got {type(values).__name__}")
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"preprocessing has unknown field(s) {unknown}")
        for key in ("input_size", "mean", "std"):
            if key not in values:
                raise ValueError(f"preprocessing lacks {key!r}")
        for key in ("interpolation", "resize_mode"):  # names, so that `in` below cannot fail on a list
            if not isinstance(values.get(key, ""), str):
                raise ValueError(f"preprocessing.{key} must be a name, got {values[key]!r}")
        size = _numbers("input_size", values["input_size"], 3, int)
        if size[0] != 3 or not all(MIN_SIDE <= s <= MAX_SIDE for s in size[1:]):
            raise ValueError(f"preprocessing.input_size must be [3, H, W] with {MIN_SIDE} <= H, W <= {MAX_SIDE}, "
                             f"got {list(size)}")
        mean = _numbers("mean", values["mean"], 3, float)
        std = _numbers("std", values["std"], 3, float)
        crop_pct = values.get("crop_pct")
        crop_pct = DEFAULT_CROP_PCT if crop_pct is None else crop_pct
        given = {"interpolation": "bilinear", "resize_mode": "crop", "jpeg_draft": True}
        given.update({k: values[k] for k in given if k in values})
        for name, ok, allowed in (
                ("mean", all(0.0 <= m <= 1.0 for m in mean), "lie in [0, 1]"),
                ("std", all(1e-3 <= s <= 10.0 for s in std), "lie in [0.001, 10]"),
                ("crop_pct", not isinstance(crop_pct, bool) and isinstance(crop_pct, (int, float))
                 and MIN_CROP_PCT <= crop_pct <= 1.0, f"lie in [{MIN_CROP_PCT}, 1]"),
                ("interpolation", given["interpolation"] in RESAMPLE, f"be one of {', '.join(RESAMPLE)}"),
                ("resize_mode", given["resize_mode"] in RESIZE_MODES, f"be one of {', '.join(RESIZE_MODES)}"),
                ("jpeg_draft", isinstance(given["jpeg_draft"], bool), "be true or false")):
            if not ok:
                raise ValueError(f"preprocessing.{name} must {allowed}, got {values.get(name)!r}")
        return cls(size, mean, std, given["interpolation"], float(crop_pct), given["resize_mode"], given["jpeg_draft"])

    def draft_size(self) -> int | None:
        """Smallest decode size that loses nothing for this spec (None: full decode).

        With ``jpeg_draft``, JPEGs much larger than the input are decoded at 1/2, 1/4 or 1/8
        scale by libjpeg (Pillow's ``draft``), never below the size the resize step needs.
        """
        if not self.jpeg_draft:
            return None
        return self.resize_side() if self.resize_mode == "crop" else max(self.height, self.width)

    def resize_side(self) -> int:
        """The side the crop mode resizes the shorter side to (also what ``--cache-images`` keeps)."""
        return int(max(self.height, self.width) / self.crop_pct)


def _numbers(name: str, value: Any, length: int, kind: type) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise ValueError(f"preprocessing.{name} must be a list of {length} numbers, got {value!r}")
    out = []
    for v in value:
        # an int beyond float's range (10**400) is not finite either; math.isfinite would overflow on it
        if isinstance(v, bool) or not isinstance(v, (int, float)) or abs(v) > 1e300 or not math.isfinite(v):
            raise ValueError(f"preprocessing.{name} must hold finite numbers, got {value!r}")
        if kind is int and v != int(v):
            raise ValueError(f"preprocessing.{name} must hold whole numbers, got {value!r}")
        out.append(kind(v))
    return tuple(out)


def open_image(source: str | Path | bytes | Image.Image) -> Image.Image:
    """Open without decoding pixels; refuse a header above ``Image.MAX_IMAGE_PIXELS``.

    Pillow raises only above twice its limit and merely warns below, so the limit is checked
    here explicitly (warning filters are not thread-safe, and decoding runs in threads).
    """
    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, (bytes, bytearray)):
        img = Image.open(io.BytesIO(source))
    else:
        img = Image.open(Path(source))
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:
        raise DecompressionBomb(f"decompression bomb refused ({img.width}x{img.height} = "
                                f"{img.width * img.height} pixels exceeds the limit of {limit})")
    return img


def decode(source: str | Path | bytes | Image.Image, draft_size: int | None = None) -> Image.Image:
    """An RGB image: first frame, reduced-scale JPEG decode, EXIF orientation, :func:`to_rgb`."""
    img = open_image(source)
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)  # animated GIF/WebP/TIFF: first frame
    if draft_size is not None and img.format == "JPEG":
        img.draft("RGB", (draft_size, draft_size))
    img.load()
    return to_rgb(ImageOps.exif_transpose(img))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: 16-bit scaled (not clipped), alpha composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in HIGH_BIT_MODES:
        return _high_bit_depth_to_rgb(img)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ALPHA_MODES:
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


def letterbox(img: Image.Image, spec: Preprocessing) -> Image.Image:
    """Longer side to fit, padded to the input size with the mean colour (nothing cropped)."""
    height, width = spec.height, spec.width
    scale = min(width / img.width, height / img.height)
    new_w, new_h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    resized = img.resize((new_w, new_h), RESAMPLE[spec.interpolation])
    canvas = Image.new("RGB", (width, height), tuple(int(round(255 * m)) for m in spec.mean))
    canvas.paste(resized, ((width - new_w) // 2, (height - new_h) // 2))
    return canvas


def resize_shorter(img: Image.Image, side: int, resample: Image.Resampling) -> Image.Image:
    """Shorter side to ``side``, the longer one ``int(side * long / short)`` (torchvision's rule)."""
    w, h = img.size
    new_w, new_h = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
    return img.resize((new_w, new_h), resample) if (new_w, new_h) != (w, h) else img


def center_crop(img: Image.Image, height: int, width: int) -> Image.Image:
    """Centre crop with torchvision's offsets ``int(round((in - out) / 2))``."""
    top, left = int(round((img.height - height) / 2.0)), int(round((img.width - width) / 2.0))
    return img.crop((left, top, left + width, top + height))


def resize(img: Image.Image, spec: Preprocessing) -> Image.Image:
    """The deterministic resize step of ``spec.resize_mode``, to exactly the input size."""
    resample = RESAMPLE[spec.interpolation]
    if spec.resize_mode == "letterbox":
        return letterbox(img, spec)
    if spec.resize_mode == "squash":
        return img.resize((spec.width, spec.height), resample)
    if spec.height == spec.width:
        img = resize_shorter(img, int(spec.height / spec.crop_pct), resample)
    else:
        img = img.resize((int(spec.width / spec.crop_pct), int(spec.height / spec.crop_pct)), resample)
    return center_crop(img, spec.height, spec.width)


def normalize(img: Image.Image | np.ndarray, spec: Preprocessing) -> np.ndarray:
    """HWC uint8 RGB -> float32 CHW, scaled to 0..1 and normalised with the spec's mean/std."""
    # multiply by float32(1/255), as torchvision's ToDtype(scale=True) does: the same bits
    arr = np.asarray(img, dtype=np.float32) * np.float32(1.0 / 255.0)
    arr = (arr - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess(img: Image.Image, spec: Preprocessing) -> np.ndarray:
    """A decoded RGB image -> the network's float32 CHW input (resize, then normalise)."""
    return normalize(resize(img, spec), spec)


def load(source: str | Path | bytes | Image.Image, spec: Preprocessing) -> np.ndarray:
    """Decode and preprocess one image; the whole evaluation path in one call."""
    return preprocess(decode(source, spec.draft_size()), spec)
