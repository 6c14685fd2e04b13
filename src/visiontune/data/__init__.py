"""Data: discovery, integrity scan, splits, decoding and transforms."""

from .image import IMAGE_EXTENSIONS, ImageDecodeError, load_image
from .scan import DataError, Splits, discover
from .transforms import eval_transform, train_transform

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "ImageDecodeError",
    "Splits",
    "discover",
    "eval_transform",
    "load_image",
    "train_transform",
]
