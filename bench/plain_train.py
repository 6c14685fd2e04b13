"""The plain PyTorch training step of visiontune's default model, as the reference for (f).

Same model, batch size, memory format (channels_last) and precision as ``visiontune train``,
on tensors already in memory: what the model alone costs, with no input pipeline and no
framework. Prints one JSON line with images/s.

Usage: python bench/plain_train.py --size 64 [--batch 32 --steps 40 --precision 32]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from visiontune.core.hardware import resolve_precision, train_autocast
from visiontune.core.registry import TRAIN_PRECISIONS
from visiontune.models.factory import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()
    model, _, _ = build_model("efficientnet_lite0", 10)
    model.train().to(memory_format=torch.channels_last)
    precision = resolve_precision(args.precision, args.size, TRAIN_PRECISIONS)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))

    def step() -> None:
        with train_autocast(precision, "cpu"):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # kernel selection and allocation are not throughput
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    rate = args.batch * args.steps / (time.perf_counter() - start)
    print(json.dumps({"images_per_second": round(rate, 1), "size": args.size, "batch": args.batch,
                      "precision": precision}))


if __name__ == "__main__":
    main()
