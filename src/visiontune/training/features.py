"""Frozen-backbone training on cached features: linear probing and frozen warm-up epochs.

A frozen backbone maps an image to the same features every epoch, so they are computed once
(K augmented views per image with ``cached_views=K``), kept in the on-disk feature cache, and the
head is trained on them. Every head type (``linear`` by gradient descent, ``logistic`` and
``svm`` by scikit-learn) ends up as the model's own classifier layer, so the result saves,
loads and exports like any other model.
"""

from __future__ import annotations

import logging
import time
import zlib

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.cache import FeatureCache, default_cache_dir, file_digests, model_key
from ..data.dataset import default_workers
from ..data.image import ImageDecodeError, load_image
from ..data.transforms import draft_size, eval_transform, train_transform
from .callbacks import append_metrics_row, format_row, start_metrics_file
from .context import TrainContext
from .module import resolve_lr, schedule_fn

log = logging.getLogger(__name__)
EVAL_VIEW = -1


class _ViewDataset(Dataset):
    """Images to encode: view -1 is the deterministic eval view, others seeded augmentations."""

    def __init__(self, items: list[tuple[str, int, int]], eval_tf, train_tf, size: tuple[int, int], draft: int | None):
        self.items, self.eval_tf, self.train_tf, self.size, self.draft = items, eval_tf, train_tf, size, draft

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        path, view, seed = self.items[index]
        try:
            image = load_image(path, self.draft)
        except (ImageDecodeError, OSError) as exc:
            log.warning("cannot read %s (%s); using a blank image", path, exc)
            return torch.zeros(3, *self.size)
        if view == EVAL_VIEW:
            return self.eval_tf(image)
        torch.manual_seed(seed)  # the same view of the same file is the same crop in every run
        return self.train_tf(image)


def _view_ids(views: int) -> list[int]:
    return [EVAL_VIEW] if views <= 1 else list(range(views))


def cached_features(ctx: TrainContext, samples, views: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[n, V, d]`` and labels ``[n]`` for ``samples``, computing only what the cache lacks."""
    cfg, pre = ctx.cfg, ctx.preprocessing
    view_ids = _view_ids(views)
    augment = cfg.augment if views > 1 else "none"
    key = model_key(ctx.model, ctx.arch.name, pre, {"views": view_ids, "augment": augment, "precision": ctx.precision})
    cache = FeatureCache(cfg.cache_dir or default_cache_dir(), key)
    digests = file_digests([p for p, _ in samples])
    keys = [[f"{d}:{v}" for v in view_ids] for d in digests]
    found = cache.get([k for row in keys for k in row])
    missing = sorted({(p, v, k) for (p, _), row in zip(samples, keys) for v, k in zip(view_ids, row) if k not in found})
    if missing:
        found.update(_encode(ctx, missing, augment))
        cache.put({k: found[k] for _, _, k in missing})
    print(f"features: {len(samples) * len(view_ids) - len(missing)} cached, {len(missing)} computed "
          f"({cache.dir})", flush=True)
    feats = torch.stack([torch.stack([found[k] for k in row]) for row in keys])
    return feats, torch.tensor([label for _, label in samples], dtype=torch.long)


def _encode(ctx: TrainContext, missing: list[tuple[str, int, str]], augment: str) -> dict[str, torch.Tensor]:
    cfg, pre = ctx.cfg, ctx.preprocessing
    items = [(path, view, zlib.crc32(key.encode()) + cfg.seed) for path, view, key in missing]
    size = (pre["input_size"][1], pre["input_size"][2])
    dataset = _ViewDataset(items, eval_transform(pre), train_transform(pre, augment), size, draft_size(pre))
    workers = default_workers(cfg.workers)
    loader = DataLoader(dataset, batch_size=cfg.batch_size * 2, num_workers=workers, pin_memory=torch.cuda.is_available())
    captured: list[torch.Tensor] = []
    head = ctx.model.get_submodule(ctx.arch.head)
    hook = head.register_forward_hook(lambda m, inp, out: captured.append(inp[0].float().flatten(1).cpu()))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Convert outside inference mode: parameters re-created inside it could never train again.
    model = ctx.model.eval().to(device, memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            for batch in loader:
                with torch.autocast(device, dtype=torch.bfloat16, enabled=ctx.precision == "bf16"):
                    model(batch.to(device).contiguous(memory_format=torch.channels_last))
    finally:
        hook.remove()
        ctx.model.to("cpu")
    feats = torch.cat(captured)
    return {key: feats[i].clone() for i, (_, _, key) in enumerate(missing)}


def fit_linear_probe(ctx: TrainContext) -> None:
    """Strategy ``linear-probe``: frozen backbone, head fit on cached features."""
    cfg = ctx.cfg
    for p in ctx.model.parameters():
        p.requires_grad = False
    start = time.perf_counter()
    train_x, train_y = cached_features(ctx, ctx.splits.train, cfg.cached_views)
    val_x, val_y = cached_features(ctx, ctx.splits.val, 1)
    head_layer = ctx.model.get_submodule(ctx.arch.head)
    start_metrics_file(ctx.run_dir / "metrics.csv")
    if cfg.head == "linear":
        train_head(ctx, head_layer, train_x, train_y, val_x[:, 0], val_y, cfg.epochs, save_best=True)
    else:
        _fit_sklearn_head(ctx, head_layer, train_x, train_y, val_x[:, 0], val_y, start)


def train_head(
    ctx: TrainContext,
    head_layer: nn.Linear,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    epochs: int,
    save_best: bool,
    passes_per_epoch: int = 1,
) -> float | None:
    """Gradient-train ``head_layer`` on features ``[n, V, d]`` (pass p uses view p mod V).

    Writes one metrics row per epoch; with ``save_best`` the best epoch is saved as ``model/``.
    ``passes_per_epoch`` > 1 makes several passes over the cached features per epoch (cheap:
    no image is decoded). Returns the best validation accuracy.
    """
    cfg = ctx.cfg
    generator = torch.Generator().manual_seed(cfg.seed)
    head_layer.train()
    for p in head_layer.parameters():
        p.requires_grad = True
    opt_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}.get(cfg.optimizer, torch.optim.AdamW)
    extra = {"momentum": cfg.momentum, "nesterov": True} if cfg.optimizer == "sgd" else {}
    opt = opt_cls(head_layer.parameters(), lr=resolve_lr(cfg), weight_decay=cfg.weight_decay, **extra)
    steps_per_pass = max(1, -(-len(train_y) // cfg.batch_size))
    steps_per_epoch = steps_per_pass * passes_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule_fn(cfg, steps_per_epoch * epochs, steps_per_epoch))
    loss_fn = nn.CrossEntropyLoss(weight=ctx.class_weights(), label_smoothing=cfg.label_smoothing)
    draw = ctx.sample_weights()
    best_acc, best_state = None, None
    for epoch in range(epochs):
        start = time.perf_counter()
        for p in range(passes_per_epoch):
            view = train_x[:, (epoch * passes_per_epoch + p) % train_x.shape[1]]
            order = (torch.multinomial(draw, len(train_y), replacement=True, generator=generator) if draw is not None
                     else torch.randperm(len(train_y), generator=generator))
            total_loss, correct = 0.0, 0  # reported for the epoch's last pass
            for i in range(0, len(order), cfg.batch_size):
                idx = order[i:i + cfg.batch_size]
                logits = head_layer(view[idx])
                loss = loss_fn(logits, train_y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total_loss += loss.item() * len(idx)
                correct += int((logits.argmax(1) == train_y[idx]).sum())
        train_seconds = time.perf_counter() - start
        with torch.no_grad():
            val_logits = head_layer(val_x)
            val_loss = float(nn.functional.cross_entropy(val_logits, val_y))
            val_acc = float((val_logits.argmax(1) == val_y).float().mean())
            score = selection_score(cfg.select_metric, val_logits, val_y)
        row = {
            "epoch": epoch + 1,
            "train_loss": f"{total_loss / len(train_y):.4f}",
            "train_accuracy": f"{correct / len(train_y):.4f}",
            "val_loss": f"{val_loss:.4f}",
            "val_accuracy": f"{val_acc:.4f}",
            "lr": f"{opt.param_groups[0]['lr']:.3g}",
            "epoch_seconds": f"{time.perf_counter() - start:.2f}",
            "train_images_per_second": f"{len(train_y) * passes_per_epoch / max(train_seconds, 1e-9):.1f}",
        }
        append_metrics_row(ctx.run_dir / "metrics.csv", row)
        print(format_row(row, cfg.epochs), flush=True)
        if best_acc is None or score > best_acc:
            best_acc = score
            best_state = {k: v.clone() for k, v in head_layer.state_dict().items()}
            if save_best:
                ctx.save_best(ctx.model, {"epoch": epoch + 1, "val_accuracy": val_acc, "val_loss": val_loss,
                                          f"val_{cfg.select_metric}": score})
    if save_best and best_state is not None:
        head_layer.load_state_dict(best_state)
    return best_acc


def selection_score(metric: str, logits: torch.Tensor, target: torch.Tensor) -> float:
    """The ``--select-metric`` value of validation logits."""
    from torchmetrics.functional.classification import multiclass_f1_score, multiclass_recall

    n = logits.shape[1]
    if metric == "macro_f1":
        return float(multiclass_f1_score(logits, target, num_classes=n, average="macro"))
    if metric == "balanced_accuracy":
        return float(multiclass_recall(logits, target, num_classes=n, average="macro"))
    return float((logits.argmax(1) == target).float().mean())


def _fit_sklearn_head(ctx: TrainContext, head_layer: nn.Linear, train_x, train_y, val_x, val_y, start: float) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    cfg = ctx.cfg
    views = train_x.shape[1]
    x = train_x.reshape(-1, train_x.shape[-1]).numpy()  # every cached view is a training sample
    y = train_y.repeat_interleave(views).numpy()
    scaler = StandardScaler().fit(x)
    balance = "balanced" if cfg.balance != "none" else None  # sklearn re-weights; no sampler needed
    if cfg.head == "logistic":
        clf = LogisticRegression(C=1.0, max_iter=2000, random_state=cfg.seed, class_weight=balance)
    else:
        clf = LinearSVC(C=0.1, max_iter=5000, random_state=cfg.seed, class_weight=balance)
    fit_start = time.perf_counter()
    clf.fit(scaler.transform(x), y)
    fit_seconds = time.perf_counter() - fit_start
    weight, bias = fold_scaler(clf.coef_, clf.intercept_, scaler, head_layer.out_features, clf.classes_)
    with torch.no_grad():
        head_layer.weight.copy_(torch.from_numpy(weight))
        head_layer.bias.copy_(torch.from_numpy(bias))
    metrics = _linear_metrics(head_layer, train_x[:, 0], train_y, val_x, val_y)
    row = {
        "epoch": 1,
        **{k: f"{v:.4f}" for k, v in metrics.items()},
        "lr": "",
        "epoch_seconds": f"{time.perf_counter() - start:.2f}",
        "train_images_per_second": f"{len(y) / max(fit_seconds, 1e-9):.1f}",
    }
    append_metrics_row(ctx.run_dir / "metrics.csv", row)
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
