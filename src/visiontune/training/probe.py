"""Heads fitted on cached frozen-backbone features: the linear probe and the frozen warm-up.

Every head kind (:data:`~visiontune.training.registry.PROBE_HEADS`: ``linear`` by gradient
descent, ``logistic`` and ``svm`` by scikit-learn, ``auto`` chosen by cross-validation) ends up as
the model's own classifier layer, so the result saves, loads and exports like any other model.

The ``linear`` head trains through the run's one Lightning loop
(:func:`~visiontune.training.lightning_fit.fit_head`): deadline, early stopping, EMA, checkpoints,
``--resume`` and metrics rows are the same callbacks as fine-tuning's. The scikit-learn heads fit
in one step; what they fit is scored by the same task metrics, written as the same metrics row
and saved by the same ``model/`` save (options that need epochs are refused for them before the
run starts: :mod:`~visiontune.training.levers`). What the scikit-learn heads and ``--head auto``
do per task is its :class:`TaskProbes` in :data:`TASK_PROBES`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data.labels import per_task
from ..data.scan import stratified_split
from ..models.factory import source_classifier
from ..task import Task
from .context import FitResult, TrainContext
from .lightning_fit import CachedFeatures, fit_head, make_head_module
from .metrics import EpochRow, MetricsLog
from .probe_selection import fit_linear, one_thread, select_probe
from .registry import PROBE_HEADS


def linear_probe(ctx: TrainContext) -> FitResult:
    """Strategy ``linear-probe``: frozen backbone, head fitted on cached features."""
    for p in ctx.model.parameters():
        p.requires_grad = False
    features, seconds = cached_features(ctx)
    result = PROBE_HEADS.get(ctx.cfg.strategy.head)(ctx, features)
    result.timings["features"] = seconds
    return result


def cached_features(ctx: TrainContext, limit: int | None = None) -> tuple[CachedFeatures, float]:
    """The frozen body's features of the training (``--cached-views`` views) and validation images,
    from the on-disk cache or computed; and the seconds that took. ``limit``: of about that many
    training images, each class in its share (the seeded per-class split the run's own validation
    split uses, :func:`~visiontune.data.scan.stratified_split`): a class-weighted loss or sampler,
    which reads the whole split's counts, then weighs them as it would the split."""
    cfg = ctx.cfg
    start = time.perf_counter()
    extractor = ctx.feature_extractor()
    train = ctx.splits.train
    chosen = list(range(len(train)))
    if limit is not None and limit < len(train):
        if ctx.task.name == "single":
            _, picked = stratified_split([(i, y) for i, (_, y) in enumerate(train)], limit / len(train),
                                         cfg.runtime.seed)
            chosen = [i for i, _ in picked]
        else:  # multi-label targets have no one class to split by
            g = torch.Generator().manual_seed(cfg.runtime.seed)
            chosen = sorted(torch.randperm(len(train), generator=g)[:limit].tolist())
    train_x, train_y, kept = extractor.features([train[i] for i in chosen], cfg.strategy.cached_views,
                                                cfg.data.augment)
    val_x, val_y, _ = extractor.features(ctx.splits.val)
    return (CachedFeatures(train_x, train_y, val_x[:, 0], val_y, [chosen[i] for i in kept]),
            time.perf_counter() - start)


def fit_gradient_head(ctx: TrainContext, features: CachedFeatures) -> FitResult:
    """``--head linear``: the classifier trained by gradient descent for ``--epochs``, in the run's loop."""
    outcome = fit_head(ctx, features, ctx.cfg.optim.epochs, resume=ctx.resume_ckpt)
    return FitResult(best_score=outcome.best)


def fit_auto_head(ctx: TrainContext, features: CachedFeatures) -> FitResult:
    """``--head auto``: the task's choice (:attr:`TaskProbes.auto`); for single-label data the probe
    repeated stratified k-fold cross-validation prefers."""
    return task_probes(ctx.task).auto(ctx, features)


def _one_vs_rest_auto_head(ctx: TrainContext, features: CachedFeatures) -> FitResult:
    """Multi-label ``--head auto``: the one-vs-rest logistic head (the cross-validated selection
    compares single-label probes)."""
    print(f"head auto: {ctx.task.title} data, using the one-vs-rest logistic head", flush=True)
    return fit_logistic_head(ctx, features)


def _cross_validated_head(ctx: TrainContext, features: CachedFeatures) -> FitResult:
    """Single-label ``--head auto``: the probe repeated stratified k-fold cross-validation prefers
    (:mod:`~visiontune.training.probe_selection`); its out-of-fold logits calibrate the model."""
    start = time.perf_counter()
    head = ctx.classifier
    x, y = features.train_x[:, 0].double().numpy(), features.train_y.numpy()
    counts = np.bincount(y, minlength=head.out_features)
    if counts.min() < 2:  # stratified folds need two images of every class
        print(f"head auto: class {ctx.splits.class_names[int(counts.argmin())]!r} has {int(counts.min())} training "
              "image(s), too few to cross-validate: using the logistic head", flush=True)
        return fit_logistic_head(ctx, features)
    source = source_classifier(ctx.cfg.model.name, ctx.cfg.model.weights, head.in_features)
    source = (source[0].double().numpy(), source[1].double().numpy()) if source is not None else None
    balanced = ctx.cfg.data.balance != "none"
    selection = select_probe(x, y, source, ctx.cfg.runtime.seed, balanced)
    for name, mean, std in selection.table:
        print(f"  {name}: {mean:.4f} +- {std:.4f}" + ("  <- chosen" if name == selection.best.name else ""))
    print(f"head auto: {selection.best.name}, {selection.repeats}x{selection.folds}-fold cross-validated "
          f"accuracy {selection.mean:.4f} +- {selection.std:.4f} on {len(y)} training images", flush=True)
    weight, bias = fit_linear(selection.best, x, y, source, head.out_features, ctx.cfg.runtime.seed, balanced)
    result = save_fitted_head(ctx, features, weight, bias, time.perf_counter() - start, len(y),
                              {"cv_accuracy": selection.mean, "cv_std": selection.std},
                              {"probe_selection": selection.summary()})
    result.calibration_logits = (torch.from_numpy(selection.oof_logits), features.train_y.clone())
    return result


def fit_logistic_head(ctx: TrainContext, features: CachedFeatures) -> FitResult:
    """``--head logistic``: scikit-learn's logistic regression on standardised features (one-vs-rest,
    one per label, for multi-label data)."""
    from sklearn.linear_model import LogisticRegression  # lazy: scikit-learn loads only for these heads

    balance = "balanced" if ctx.cfg.data.balance != "none" else None  # sklearn re-weights; no sampler needed
    clf = LogisticRegression(C=1.0, max_iter=2000, random_state=ctx.cfg.runtime.seed, class_weight=balance)
    return _fit_sklearn_head(ctx, clf, features)


def fit_svm_head(ctx: TrainContext, features: CachedFeatures) -> FitResult:
    """``--head svm``: scikit-learn's linear SVM on standardised features."""
    from sklearn.svm import LinearSVC  # lazy: scikit-learn loads only for these heads

    balance = "balanced" if ctx.cfg.data.balance != "none" else None
    clf = LinearSVC(C=0.1, max_iter=5000, random_state=ctx.cfg.runtime.seed, class_weight=balance)
    return _fit_sklearn_head(ctx, clf, features)


def _fit_sklearn_head(ctx: TrainContext, clf, features: CachedFeatures) -> FitResult:
    from sklearn.preprocessing import StandardScaler  # lazy: as above

    train_x, train_y = features.train_x, features.train_y
    views = train_x.shape[1]
    x = train_x.reshape(-1, train_x.shape[-1]).numpy()  # every cached view is a training sample
    y = train_y.repeat_interleave(views, dim=0).numpy()
    scaler = StandardScaler().fit(x)
    fit_start = time.perf_counter()
    with one_thread():
        weight, bias = task_probes(ctx.task).fit_sklearn(clf, scaler, x, y, ctx.classifier.out_features)
    return save_fitted_head(ctx, features, weight, bias, time.perf_counter() - fit_start, len(y))


def save_fitted_head(ctx: TrainContext, features: CachedFeatures, weight: np.ndarray, bias: np.ndarray,
                     seconds: float, samples: int, metrics: dict[str, float] | None = None,
                     training: dict[str, Any] | None = None) -> FitResult:
    """A head fitted in one step, recorded as the loop records an epoch: the layer set to
    ``(weight, bias)``, scored by the same loss and task metrics as a trained epoch
    (:meth:`HeadModule.evaluate <visiontune.training.module.HeadModule.evaluate>`), written as
    epoch 1 of ``metrics.csv``, and the whole model saved as ``model/`` by the same save.

    Args:
        seconds: the fit's duration; ``samples``: the rows it fitted (for the images/s column).
        metrics: more figures for the model card (a cross-validation's).
        training: more facts for the card's training section (the probe selection).
    """
    head = ctx.classifier
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
        head.bias.copy_(torch.from_numpy(bias))
    module = make_head_module(ctx)
    m = {**module.evaluate(features.train_x[:, 0], features.train_y, "train"),
         **module.evaluate(features.val_x, features.val_y, "val")}
    log = MetricsLog(ctx.layout.metrics_csv, 1)
    log.start()
    log.append(EpochRow(1, m["train_loss"], m["train_accuracy"], m["val_loss"], m["val_accuracy"], None,
                        seconds, samples / max(seconds, 1e-9)))
    ctx.save_best({"epoch": 1, **{k: v for k, v in m.items() if k.startswith("val_")}, **(metrics or {})}, training)
    return FitResult(best_score=m.get(f"val_{ctx.cfg.optim.select_metric}"))


def _fit_multiclass(clf, scaler, x: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Single-label: ``clf`` fitted on the standardised features, one logit per class."""
    clf.fit(scaler.transform(x), y)
    return fold_scaler(clf.coef_, clf.intercept_, scaler, num_classes, clf.classes_)


def _fit_one_vs_rest(clf, scaler, x: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Multi-label: one ``clf`` per label (one-vs-rest) on the standardised features, one logit per label."""
    from sklearn.multiclass import OneVsRestClassifier  # lazy: scikit-learn loads only for these heads

    clf = OneVsRestClassifier(clf).fit(scaler.transform(x), y.astype(int))
    return fold_scaler_per_label(clf.estimators_, scaler, x.shape[1])


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


@dataclass(frozen=True)
class TaskProbes:
    """How the heads on cached features fit one task's labels (see :func:`task_probes`).

    Attributes:
        auto: ``--head auto``, called as every head of :data:`~visiontune.training.registry.PROBE_HEADS` is:
            ``(ctx, features) -> FitResult``.
        fit_sklearn: ``(clf, scaler, x, y, num_classes) -> (weight, bias)``: a scikit-learn linear
            model fitted on the standardised features ``x``, folded with the scaler into the
            classifier layer's weight ``[C, d]`` and bias ``[C]``.
    """

    auto: Callable[..., FitResult]
    fit_sklearn: Callable[..., tuple[np.ndarray, np.ndarray]]


#: Each task's :class:`TaskProbes`, by :attr:`Task.name <visiontune.task.Task.name>`.
TASK_PROBES = {"single": TaskProbes(_cross_validated_head, _fit_multiclass),
               "multi": TaskProbes(_one_vs_rest_auto_head, _fit_one_vs_rest)}


def task_probes(task: str | Task) -> TaskProbes:
    """The :class:`TaskProbes` of ``task`` (a task or its name); KeyError lists the tasks that have one."""
    return per_task(TASK_PROBES, task, "probe fitting")
