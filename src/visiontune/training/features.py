"""Linear probing: features from the frozen backbone are computed once, then a head is fit.

The head is always a linear map over the backbone's pre-logit features, so every head type
(``linear`` trained by gradient descent, ``logistic`` and ``svm`` fit by scikit-learn) ends up
as the model's own classifier layer and saves, loads and exports like any other model.
"""

from __future__ import annotations

import csv
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..data.dataset import ImageListDataset, default_workers, make_loader
from ..data.transforms import eval_transform
from .callbacks import METRIC_COLUMNS, format_row
from .context import TrainContext


class HeadOnly(nn.Module):
    """The classifier alone, trained on cached features."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.classifier = nn.Linear(head.in_features, head.out_features)
        self.classifier.load_state_dict(head.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


@torch.inference_mode()
def extract_features(
    model: nn.Module, head: str, samples, preprocessing: dict, batch_size: int, workers: int, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-logit features (the head's input) for every sample, in eval mode."""
    captured: list[torch.Tensor] = []
    hook = model.get_submodule(head).register_forward_hook(lambda m, inp, out: captured.append(inp[0].float()))
    loader = make_loader(ImageListDataset(samples, eval_transform(preprocessing)), batch_size, False, workers)
    labels = []
    model.eval().to(memory_format=torch.channels_last)
    try:
        for x, y in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                model(x.contiguous(memory_format=torch.channels_last))
            labels.append(y)
    finally:
        hook.remove()
    return torch.cat(captured).flatten(1), torch.cat(labels)


def fit_linear_probe(ctx: TrainContext) -> None:
    cfg = ctx.cfg
    for p in ctx.model.parameters():
        p.requires_grad = False
    if cfg.augment != "none":
        print("linear-probe: features are computed once from un-augmented images (augment ignored)")
    workers = default_workers(cfg.workers)
    start = time.perf_counter()
    train_x, train_y = extract_features(ctx.model, ctx.arch.head, ctx.splits.train, ctx.preprocessing, cfg.batch_size * 2, workers, ctx.precision)
    val_x, val_y = extract_features(ctx.model, ctx.arch.head, ctx.splits.val, ctx.preprocessing, cfg.batch_size * 2, workers, ctx.precision)
    print(f"features: {tuple(train_x.shape)} train, {tuple(val_x.shape)} val in {time.perf_counter() - start:.1f}s")
    head_layer = ctx.model.get_submodule(ctx.arch.head)
    if cfg.head == "linear":
        _fit_gradient_head(ctx, head_layer, train_x, train_y, val_x, val_y)
    else:
        _fit_sklearn_head(ctx, head_layer, train_x, train_y, val_x, val_y, start)


def _fit_gradient_head(ctx: TrainContext, head_layer: nn.Linear, train_x, train_y, val_x, val_y) -> None:
    from .lightning_fit import fit_lightning

    cfg = ctx.cfg
    head_only = HeadOnly(head_layer)
    loaders = (
        make_loader(TensorDataset(train_x, train_y), cfg.batch_size, True, 0, cfg.seed),
        make_loader(TensorDataset(val_x, val_y), cfg.batch_size * 4, False, 0),
    )

    def export(trained: nn.Module) -> nn.Module:
        head_layer.load_state_dict(trained.classifier.state_dict())
        return ctx.model

    fit_lightning(ctx, [], [], None, loaders=loaders, model=head_only, head="classifier", export=export)


def _fit_sklearn_head(ctx: TrainContext, head_layer: nn.Linear, train_x, train_y, val_x, val_y, start: float) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    cfg = ctx.cfg
    x, y = train_x.numpy(), train_y.numpy()
    scaler = StandardScaler().fit(x)
    if cfg.head == "logistic":
        clf = LogisticRegression(C=1.0, max_iter=2000, random_state=cfg.seed)
    else:
        clf = LinearSVC(C=0.1, max_iter=5000, random_state=cfg.seed)
    fit_start = time.perf_counter()
    clf.fit(scaler.transform(x), y)
    fit_seconds = time.perf_counter() - fit_start
    weight, bias = fold_scaler(clf.coef_, clf.intercept_, scaler, head_layer.out_features, clf.classes_)
    with torch.no_grad():
        head_layer.weight.copy_(torch.from_numpy(weight))
        head_layer.bias.copy_(torch.from_numpy(bias))
    metrics = _linear_metrics(head_layer, train_x, train_y, val_x, val_y)
    row = {
        "epoch": 1,
        **{k: f"{v:.4f}" for k, v in metrics.items()},
        "lr": "",
        "epoch_seconds": f"{time.perf_counter() - start:.2f}",
        "train_images_per_second": f"{len(y) / max(fit_seconds, 1e-9):.1f}",
    }
    with open(ctx.run_dir / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerow(row)
    print(format_row(row, 1), flush=True)
    ctx.save_best(ctx.model, {"epoch": 1, "val_accuracy": metrics["val_accuracy"], "val_loss": metrics["val_loss"]})


def fold_scaler(coef, intercept, scaler, num_classes: int, classes) -> tuple[np.ndarray, np.ndarray]:
    """Turn scaler + linear model into one affine map producing a logit per class.

    Binary scikit-learn models give one score s for class 1: logits [0, s] have the same
    softmax (sigmoid) and argmax.
    """
    coef = np.asarray(coef, dtype=np.float64)
    intercept = np.asarray(intercept, dtype=np.float64).reshape(-1)
    w = coef / scaler.scale_
    b = intercept - w @ scaler.mean_
    weight = np.zeros((num_classes, coef.shape[1]), dtype=np.float32)
    bias = np.full(num_classes, -1e4 if len(classes) < num_classes else 0.0, dtype=np.float32)
    if coef.shape[0] == 1:  # binary
        weight[classes[1]], bias[classes[1]] = w[0], b[0]
        bias[classes[0]] = 0.0
    else:
        for row, cls in enumerate(classes):
            weight[cls], bias[cls] = w[row], b[row]
    return weight, bias


@torch.no_grad()
def _linear_metrics(head_layer: nn.Linear, train_x, train_y, val_x, val_y) -> dict[str, float]:
    out = {}
    for prefix, x, y in (("train", train_x, train_y), ("val", val_x, val_y)):
        logits = head_layer(x)
        out[f"{prefix}_loss"] = float(nn.functional.cross_entropy(logits, y))
        out[f"{prefix}_accuracy"] = float((logits.argmax(1) == y).float().mean())
    return out

