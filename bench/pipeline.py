"""(d) Does the input pipeline keep up with the model? Finetune at 224 px on full-size photos.

Measures, each alone on the machine: images/s that visiontune's training DataLoader delivers
(decode + augment, default workers), and images/s of a training step of the model (the same
precision and memory format as `visiontune train`). Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace

import torch

from visiontune.core.hardware import resolve_precision
from visiontune.data.dataset import ImageListDataset, default_workers, make_loader
from visiontune.data.scan import discover
from visiontune.data.transforms import train_transform
from visiontune.models.factory import build_model


def pipeline_rate(samples, pre, draft: bool, batches: int = 12) -> tuple[float, int]:
    workers = default_workers(None)
    dataset = ImageListDataset(samples, train_transform(pre, "standard"), replace(pre, jpeg_draft=draft).draft_size())
    loader = make_loader(dataset, 32, workers)
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
    return n / (time.perf_counter() - start), workers


def model_rate(pre, steps: int = 6) -> float:
    model, _, _ = build_model("efficientnet_lite0", 2)
    model.train().to(memory_format=torch.channels_last)
    precision = resolve_precision("auto", pre.height)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    x = torch.randn(32, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (32,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return 32 * steps / (time.perf_counter() - start)


def main() -> None:
    splits = discover(sys.argv[1], scan=False)
    _, _, pre = build_model("efficientnet_lite0", 2)
    draft_rate, workers = pipeline_rate(splits.train, pre, True)
    full_rate, _ = pipeline_rate(splits.train, pre, False)
    print(json.dumps({"pipeline_images_per_second": round(draft_rate, 1),
                      "full_decode_images_per_second": round(full_rate, 1),
                      "model_images_per_second": round(model_rate(pre), 1), "workers": workers}))


if __name__ == "__main__":
    main()
