"""(d) Does the input pipeline keep up with the model? Data vs model images/s at 64, 128, 224 px.

Measures, each alone on the machine, at each input size:
- the images/s visiontune's training loader delivers from images held in memory (decoded once,
  augmented as batched tensors in the training process: what ``--cache-images`` and the planner
  use), on CIFAR-10's 32-px images (crop-flip, squash: the planner's recipe for small images)
  and, at 224 px, on the ants/bees photos (random resized crops);
- the images/s of a training step of the model (batch 64, the precision ``auto`` picks at that
  size, channels_last, as ``visiontune train``).
- at 224 px also the loader over files (decode + augment in worker processes).

Usage: python bench/pipeline.py CIFAR_DIR HYMENOPTERA_DIR  (prints one JSON line)
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace

import torch

from visiontune.core.hardware import autocast, resolve_precision
from visiontune.data.dataset import ImageListDataset, default_workers, make_loader
from visiontune.data.memory import MemoryImages, MemoryTrainSet, store_side
from visiontune.data.sampling import EpochSampler
from visiontune.data.scan import discover
from visiontune.data.transforms import tensor_train_transform, train_transform
from visiontune.models.factory import build_model

BATCH = 64


def _rate(loader, batches: int) -> float:
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        try:
            x, _ = next(it)
        except StopIteration:
            it = iter(loader)
            x, _ = next(it)
        n += len(x)
    return n / (time.perf_counter() - start)


def memory_rate(samples, pre, augment: str, batches: int = 30) -> float:
    images = MemoryImages([p for p, _ in samples], store_side(pre, augment), pre.draft_size())
    dataset = MemoryTrainSet(samples, images, pre, augment, tensor_train_transform(pre, augment))
    loader = make_loader(dataset, BATCH, 0, sampler=EpochSampler(len(dataset), 0), collate_fn=dataset.collate)
    return _rate(loader, batches)


def disk_rate(samples, pre, batches: int = 12) -> tuple[float, int]:
    workers = default_workers(None)
    dataset = ImageListDataset(samples, train_transform(pre, "standard"), pre.draft_size())
    return _rate(make_loader(dataset, BATCH, workers), batches), workers


def model_rate(size: int, steps: int = 5) -> tuple[float, str]:
    model, _, _ = build_model("efficientnet_lite0", 10)
    model.train().to(memory_format=torch.channels_last)
    precision = resolve_precision("auto", size)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    x = torch.randn(BATCH, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (BATCH,))

    def step():
        with autocast(precision, "cpu"):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return BATCH * steps / (time.perf_counter() - start), precision


def main() -> None:
    cifar = discover(sys.argv[1], scan=False).train[:4000]
    photos = discover(sys.argv[2], scan=False).train
    _, _, pre = build_model("efficientnet_lite0", 10)
    out = {}
    for size in (64, 128, 224):
        spec = replace(pre, input_size=(3, size, size), resize_mode="squash", crop_pct=1.0)
        data = memory_rate(cifar, spec, "crop-flip")
        model, precision = model_rate(size)
        out[str(size)] = {"data": round(data, 1), "model": round(model, 1), "precision": precision}
    out["224"]["data_photos"] = round(memory_rate(photos, pre, "standard", batches=6), 1)
    out["224"]["disk_photos"], out["workers"] = disk_rate(photos, pre)
    out["224"]["disk_photos"] = round(out["224"]["disk_photos"], 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
