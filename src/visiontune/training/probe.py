"""Heads fitted on cached frozen-backbone features: the linear probe and the frozen warm-up.

Every head kind (:data:`~visiontune.training.registry.PROBE_HEADS`: ``linear`` by gradient
descent, ``logistic`` and ``svm`` by scikit-learn) ends up as the model's own classifier layer,
so the result saves, loads and exports like any other model.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from ..models.factory import source_classifier
from .context import TrainContext
from .metrics import EpochRow, MetricsLog, selection_score
from .objective import accuracy_of, loss_function, plain_loss
from .optim import make_optimizer, make_scheduler
from .probe_selection import fit_linear, select_probe
from .registry import PROBE_HEADS


def linear_probe(ctx: TrainContext) -> None:
    """Strategy ``linear-probe``: frozen backbone, head fitted on cached features."""
    cfg = ctx.cfg
    for p in ctx.model.parameters():
        p.requires_grad = False
    start = time.perf_counter()
    extractor = ctx.feature_extractor()
    train_x, train_y, _ = extractor.features(ctx.splits.train, cfg.strategy.cached_views, cfg.data.augment)
    val_x, val_y, _ = extractor.features(ctx.splits.val)
    ctx.timings["features"] = time.perf_counter() - start
    MetricsLog(ctx.layout.metrics_csv, cfg.optim.epochs).start()
    PROBE_HEADS.get(cfg.strategy.head)(ctx, ctx.classifier, train_x, train_y, val_x[:, 0], val_y, start)


def fit_gradient_head(ctx: TrainContext, head: nn.Linear, train_x, train_y, val_x, val_y, start: float) -> None:
    """``--head linear``: the classifier trained by gradient descent for ``epochs``."""
    train_head(ctx, head, train_x, train_y, val_x, val_y, ctx.cfg.optim.epochs, save_best=True)


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
    no image is decoded). Returns the best validation score (``--select-metric``).
    """
    cfg = ctx.cfg
    generator = torch.Generator().manual_seed(cfg.runtime.seed)
    head_layer.train()
    for p in head_layer.parameters():
        p.requires_grad = True
    opt = make_optimizer(head_layer.parameters(), ctx.optimizer_settings())
    batch_size = ctx.batch_size
    steps_per_pass = max(1, -(-len(train_y) // batch_size))
    steps_per_epoch = steps_per_pass * passes_per_epoch
    sched = make_scheduler(opt, ctx.schedule_settings(), steps_per_epoch * epochs, steps_per_epoch)
    loss_fn = loss_function(ctx.multi_label, ctx.class_weights(), cfg.optim.label_smoothing)
    draw = ctx.sample_weights()
    log = MetricsLog(ctx.layout.metrics_csv, cfg.optim.epochs)
    best_score, best_state = None, None
    for epoch in range(epochs):
        if epoch and ctx.deadline is not None and time.time() >= ctx.deadline - _finish_reserve(ctx):
            print(f"time budget: stopping the head's training after {epoch} epoch(s); the best is kept")
            break
        start = time.perf_counter()
        for p in range(passes_per_epoch):
            view = train_x[:, (epoch * passes_per_epoch + p) % train_x.shape[1]]
            order = (torch.multinomial(draw, len(train_y), replacement=True, generator=generator) if draw is not None
                     else torch.randperm(len(train_y), generator=generator))
            total_loss, correct = 0.0, 0.0  # reported for the epoch's last pass
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                logits = head_layer(view[idx])
                loss = loss_fn(logits, train_y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total_loss += loss.item() * len(idx)
                correct += accuracy_of(logits.detach(), train_y[idx]) * len(idx)
        train_seconds = time.perf_counter() - start
        with torch.no_grad():
            val_logits = head_layer(val_x)
            val_loss, val_acc = plain_loss(val_logits, val_y), accuracy_of(val_logits, val_y)
            score = selection_score(cfg.optim.select_metric, val_logits, val_y)
        log.append(EpochRow(epoch + 1, total_loss / len(train_y), correct / len(train_y), val_loss, val_acc,
                            opt.param_groups[0]["lr"], time.perf_counter() - start,
                            len(train_y) * passes_per_epoch / max(train_seconds, 1e-9)))
        if best_score is None or score > best_score:
            best_score = score
            best_state = {k: v.clone() for k, v in head_layer.state_dict().items()}
            if save_best:
                ctx.save_best(ctx.model, {"epoch": epoch + 1, "val_accuracy": val_acc, "val_loss": val_loss,
                                          f"val_{cfg.optim.select_metric}": score})
    if save_best and best_state is not None:
        head_layer.load_state_dict(best_state)
    return best_score


def _finish_reserve(ctx: TrainContext) -> float:
    return ctx.plan.projected.get("finish", 0.0) if ctx.plan is not None else 0.0


def fit_auto_head(ctx: TrainContext, head: nn.Linear, train_x, train_y, val_x, val_y, start: float) -> None:
    """``--head auto``: the probe repeated stratified k-fold cross-validation prefers
    (:mod:`~visiontune.training.probe_selection`); its out-of-fold logits calibrate the model."""
    if ctx.multi_label:  # the cross-validated selection compares single-label probes
        print("head auto: multi-label data, using the one-vs-rest logistic head", flush=True)
        fit_logistic_head(ctx, head, train_x, train_y, val_x, val_y, start)
        return
    x, y = train_x[:, 0].double().numpy(), train_y.numpy()
    counts = np.bincount(y, minlength=head.out_features)
    if counts.min() < 2:  # stratified folds need two images of every class
        print(f"head auto: class {ctx.splits.class_names[int(counts.argmin())]!r} has {int(counts.min())} training "
              "image(s), too few to cross-validate: using the logistic head", flush=True)
        fit_logistic_head(ctx, head, train_x, train_y, val_x, val_y, start)
        return
    source = source_classifier(ctx.cfg.model.name, ctx.cfg.model.weights, head.in_features)
    source = (source[0].double().numpy(), source[1].double().numpy()) if source is not None else None
    balanced = ctx.cfg.data.balance != "none"
    selection = select_probe(x, y, source, ctx.cfg.runtime.seed, balanced)
    for name, mean, std in selection.table:
        print(f"  {name}: {mean:.4f} +- {std:.4f}" + ("  <- chosen" if name == selection.best.name else ""))
    print(f"head auto: {selection.best.name}, {selection.repeats}x{selection.folds}-fold cross-validated "
          f"accuracy {selection.mean:.4f} +- {selection.std:.4f} on {len(y)} training images", flush=True)
    weight, bias = fit_linear(selection.best, x, y, source, head.out_features, ctx.cfg.runtime.seed, balanced)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
        head.bias.copy_(torch.from_numpy(bias))
    ctx.extra_training["probe_selection"] = selection.summary()
    ctx.calibration_logits = (torch.from_numpy(selection.oof_logits), train_y.clone())
    m = _linear_metrics(head, train_x[:, 0], train_y, val_x, val_y)
    MetricsLog(ctx.layout.metrics_csv, 1).append(EpochRow(
        1, m["train_loss"], m["train_accuracy"], m["val_loss"], m["val_accuracy"], None,
        time.perf_counter() - start, len(y) / max(time.perf_counter() - start, 1e-9)))
    ctx.save_best(ctx.model, {"epoch": 1, "val_accuracy": m["val_accuracy"], "val_loss": m["val_loss"],
                              "cv_accuracy": selection.mean, "cv_std": selection.std})


def fit_logistic_head(ctx: TrainContext, head: nn.Linear, train_x, train_y, val_x, val_y, start: float) -> None:
    """``--head logistic``: scikit-learn's logistic regression on standardised features (one-vs-rest,
    one per label, for multi-label data)."""
    from sklearn.linear_model import LogisticRegression  # lazy: scikit-learn loads only for these heads

    balance = "balanced" if ctx.cfg.data.balance != "none" else None  # sklearn re-weights; no sampler needed
    clf = LogisticRegression(C=1.0, max_iter=2000, random_state=ctx.cfg.runtime.seed, class_weight=balance)
    _fit_sklearn_head(ctx, clf, head, train_x, train_y, val_x, val_y, start)


def fit_svm_head(ctx: TrainContext, head: nn.Linear, train_x, train_y, val_x, val_y, start: float) -> None:
    """``--head svm``: scikit-learn's linear SVM on standardised features."""
    from sklearn.svm import LinearSVC  # lazy: scikit-learn loads only for these heads

    balance = "balanced" if ctx.cfg.data.balance != "none" else None
    clf = LinearSVC(C=0.1, max_iter=5000, random_state=ctx.cfg.runtime.seed, class_weight=balance)
    _fit_sklearn_head(ctx, clf, head, train_x, train_y, val_x, val_y, start)


def _fit_sklearn_head(ctx: TrainContext, clf, head_layer: nn.Linear, train_x, train_y, val_x, val_y,
                      start: float) -> None:
    from sklearn.preprocessing import StandardScaler  # lazy: as above

    views = train_x.shape[1]
    x = train_x.reshape(-1, train_x.shape[-1]).numpy()  # every cached view is a training sample
    y = train_y.repeat_interleave(views, dim=0).numpy()
    scaler = StandardScaler().fit(x)
    fit_start = time.perf_counter()
    if ctx.multi_label:
        from sklearn.multiclass import OneVsRestClassifier  # lazy: as above

        clf = OneVsRestClassifier(clf).fit(scaler.transform(x), y.astype(int))
        weight, bias = fold_scaler_per_label(clf.estimators_, scaler, x.shape[1])
    else:
        clf.fit(scaler.transform(x), y)
        weight, bias = fold_scaler(clf.coef_, clf.intercept_, scaler, head_layer.out_features, clf.classes_)
    fit_seconds = time.perf_counter() - fit_start
    with torch.no_grad():
        head_layer.weight.copy_(torch.from_numpy(weight))
        head_layer.bias.copy_(torch.from_numpy(bias))
    m = _linear_metrics(head_layer, train_x[:, 0], train_y, val_x, val_y)
    MetricsLog(ctx.layout.metrics_csv, 1).append(EpochRow(
        1, m["train_loss"], m["train_accuracy"], m["val_loss"], m["val_accuracy"], None,
        time.perf_counter() - start, len(y) / max(fit_seconds, 1e-9)))
    ctx.save_best(ctx.model, {"epoch": 1, "val_accuracy": m["val_accuracy"], "val_loss": m["val_loss"]})


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


def fold_scaler_per_label(estimators: list, scaler, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest binary models (one per label) folded with the scaler into one affine map whose
    outputs are each label's logit. A label that was always (never) present in training gets
    scikit-learn's constant predictor: a fixed logit of +(-)``CONSTANT_LOGIT``."""
    weight = np.zeros((len(estimators), dim), dtype=np.float32)
    bias = np.zeros(len(estimators), dtype=np.float32)
    for row, est in enumerate(estimators):
        if hasattr(est, "coef_"):
            w = np.asarray(est.coef_, dtype=np.float64).reshape(-1) / scaler.scale_
            weight[row], bias[row] = w, float(np.asarray(est.intercept_).reshape(-1)[0]) - w @ scaler.mean_
        else:
            bias[row] = CONSTANT_LOGIT if float(np.asarray(est.y_).reshape(-1)[0]) > 0.5 else -CONSTANT_LOGIT
    return weight, bias


CONSTANT_LOGIT = 10.0  # sigmoid(10) = 0.99995: certain, yet finite for the loss and calibration


@torch.no_grad()
def _linear_metrics(head_layer: nn.Linear, train_x, train_y, val_x, val_y) -> dict[str, float]:
    out = {}
    for prefix, x, y in (("train", train_x, train_y), ("val", val_x, val_y)):
        logits = head_layer(x)
        out[f"{prefix}_loss"], out[f"{prefix}_accuracy"] = plain_loss(logits, y), accuracy_of(logits, y)
    return out
