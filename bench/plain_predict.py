"""Baseline for prediction speed: a plain eager fp32 loop, as most users write it.

PIL decode + convert("RGB"), the backbone's timm eval transform, batches of 32 through
``model.eval()`` under ``torch.no_grad()``, softmax, top-1. Prints one JSON line.

Example:
    python bench/plain_predict.py --model-dir runs/train-1/model file1.jpg file2.jpg ...
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms as T


def build(model_dir: Path):
    import timm

    meta = json.loads((model_dir / "model.json").read_text())
    arch = meta["architecture"]
    model = timm.create_model(arch["name"], num_classes=arch["num_classes"])
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    pre = meta["preprocessing"]
    size = pre["input_size"][-1]
    interp = T.InterpolationMode(pre["interpolation"])
    transform = T.Compose([
        T.Resize(int(size / pre["crop_pct"]), interpolation=interp),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(pre["mean"], pre["std"]),
    ])
    return model.eval(), transform, meta["class_names"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None, help="write path,label CSV here")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    model, transform, names = build(args.model_dir)
    start = time.perf_counter()
    rows = []
    with torch.no_grad():
        for i in range(0, len(args.files), args.batch_size):
            chunk = args.files[i:i + args.batch_size]
            batch = torch.stack([transform(Image.open(f).convert("RGB")) for f in chunk])
            top = torch.softmax(model(batch), dim=1).argmax(1)
            rows.extend(zip(chunk, (names[j] for j in top.tolist())))
    seconds = time.perf_counter() - start
    if args.out:
        args.out.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    print(json.dumps({"images": len(rows), "seconds": round(seconds, 2),
                      "images_per_second": round(len(rows) / seconds, 1)}))


if __name__ == "__main__":
    main()
