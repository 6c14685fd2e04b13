"""Classify images with a visiontune ONNX export using only numpy, Pillow and onnxruntime.

Usage:
    python onnx_client.py model.onnx photo.jpg [more.jpg ...] [--top-k 3]

Everything the client needs (class names, preprocessing, temperature) is read from the ONNX
file's ``metadata_props``. The preprocessing reproduces visiontune's exactly: JPEG draft
decode, EXIF transpose, RGB conversion (alpha composited on white), resize of the shorter side
to int(size / crop_pct) with the stored interpolation (antialiased, as Pillow always is),
centre crop, scale to 0..1 and normalise with mean/std. Output: ``path,label,probability``.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


def draft_size(pre: dict) -> int | None:
    """Same rule as visiontune: decode big JPEGs at reduced scale, never below the resize target."""
    if not pre.get("jpeg_draft"):
        return None
    _, height, width = pre["input_size"]
    if pre.get("resize_mode", "crop") == "crop":
        return int(max(height, width) / float(pre.get("crop_pct", 0.875) or 1.0))
    return max(height, width)


def load_rgb(path: str, draft: int | None) -> Image.Image:
    img = Image.open(path)
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    if draft is not None and img.format == "JPEG":
        img.draft("RGB", (draft, draft))
    img.load()
    img = ImageOps.exif_transpose(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def resize_crop(img: Image.Image, pre: dict) -> Image.Image:
    """Shorter side to int(size / crop_pct) (torchvision Resize rounding), then centre crop."""
    _, height, width = (int(v) for v in pre["input_size"])
    resample = RESAMPLE[pre.get("interpolation", "bilinear")]
    mode = pre.get("resize_mode", "crop")
    if mode == "squash":
        return img.resize((width, height), resample)
    if mode == "letterbox":
        scale = min(width / img.width, height / img.height)
        new_w, new_h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
        canvas = Image.new("RGB", (width, height), tuple(int(round(255 * m)) for m in pre["mean"]))
        canvas.paste(img.resize((new_w, new_h), resample), ((width - new_w) // 2, (height - new_h) // 2))
        return canvas
    crop_pct = float(pre.get("crop_pct", 0.875) or 1.0)
    if height == width:
        short = int(height / crop_pct)
        w, h = img.size
        # torchvision: the shorter side becomes `short`, the longer one int(short * long / short_side)
        new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    else:
        new_h, new_w = int(height / crop_pct), int(width / crop_pct)
    img = img.resize((new_w, new_h), resample)
    # torchvision CenterCrop offsets: int(round((in - out) / 2.0))
    top, left = int(round((new_h - height) / 2.0)), int(round((new_w - width) / 2.0))
    return img.crop((left, top, left + width, top + height))


def preprocess(path: str, pre: dict) -> np.ndarray:
    img = resize_crop(load_rgb(path, draft_size(pre)), pre)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32)
    return arr.transpose(2, 0, 1)[None]  # HWC -> NCHW


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--top-k", type=int, default=1)
    args = parser.parse_args(argv)
    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map
    names, pre = json.loads(props["class_names"]), json.loads(props["preprocessing"])
    input_name = session.get_inputs()[0].name
    print("path,label,probability" + "".join(f",top{i}_label,top{i}_probability" for i in range(2, args.top_k + 1)))
    for path in args.images:
        # probabilities already include softmax and the calibration temperature (in the graph)
        probs = session.run(["probabilities"], {input_name: preprocess(path, pre)})[0][0]
        order = np.argsort(-probs)[:max(1, args.top_k)]
        print(path + "".join(f",{names[i]},{probs[i]:.6f}" for i in order))
    return 0


if __name__ == "__main__":
    sys.exit(main())
