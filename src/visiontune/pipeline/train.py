"""``visiontune.train``: data -> model -> strategy -> run dir, then evaluation, calibration and report."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.hardware import is_rank_zero
from ..core.safe_io import atomic_write_text
from ..evaluation.calibration import store_calibration
from ..evaluation.evaluate import HEADLINE_METRICS, calibrate_run, metrics_of_logits
from ..evaluation.parts import parts_of
from ..evaluation.plots import plot_curves
from ..evaluation.report import write_report
from ..inference.classifier import Classifier
from ..models.artifact import read_card, write_card
from ..models.unknown import mean_of_taps
from ..training.budget import format_duration
from ..training.config import TrainConfig, read_yaml
from ..training.context import TrainContext
from ..training.registry import AUTO_TTA
from ..training.setup import fit, setup_run
from ..training.tta_choice import AUTO, why_one_view
from ..training.tta_choice import choose as choose_between
from ..training.unknown import MAX_VAL_IMAGES, Taps, describe, fit_unknown, sources_of, store_unknown


@dataclass
class Run:
    """The result of :func:`train`: where the run lies and how the best model scored."""

    run_dir: Path
    model_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Classifier:
        """The best model as a :class:`~visiontune.inference.classifier.Classifier`."""
        return Classifier.load(self.model_dir)


def train(data: str | os.PathLike | None = None, started: float | None = None, **options: Any) -> Run:
    """Fine-tune a pretrained classifier on a folder of labelled images.

    Args:
        data: ``DATA/<class>/*``, ``DATA/{train,val[,test]}/<class>/*`` or a ``path,label`` CSV.
        started: when the time of a ``time=`` budget began (``time.time()`` units); default: now.
        **options: any option of ``visiontune train`` by its key, e.g. ``epochs=5``,
            ``model="resnet50"``, ``strategy="linear-probe"``; ``config="run.yaml"`` reads a file.

    Returns:
        A :class:`Run` with ``run_dir``, ``model_dir`` and the best model's metrics.

    Example:
        >>> import visiontune
        >>> run = visiontune.train("data/hymenoptera/train", epochs=3)  # doctest: +SKIP
        >>> run.metrics["val"]["accuracy"]  # doctest: +SKIP
        0.96
    """
    values: dict[str, Any] = {}
    config_file = options.pop("config", None)
    if config_file:
        values.update(read_yaml(config_file))
    if data is not None:
        values["data"] = str(data)
    values.update(options)
    return run_training(TrainConfig.from_dict(values), started)


def run_training(cfg: TrainConfig, started: float | None = None) -> Run:
    """The whole ``train`` command: set up, fit, then evaluate, calibrate and report (rank 0).

    ``started`` is when the command's time began (default: now); the CLI passes its process start,
    so that a ``--time`` budget and ``timings.json`` include the interpreter's start-up. With
    ``unlabeled``, the run is a self-training (:mod:`~visiontune.pipeline.self_training`).
    """
    started = time.time() if started is None else started
    if cfg.data.unlabeled:  # a teacher and a student run, each through this function
        from .self_training import self_train

        return self_train(cfg, started, run_training)
    ctx = setup_run(cfg, started=started)
    ctx.timings["start"] = time.time() - started
    began = time.time()
    fit(ctx)
    ctx.timings["train"] = time.time() - began - ctx.timings.get("features", 0.0)
    if not is_rank_zero():  # other DDP ranks only train; rank 0 evaluates and writes
        return Run(ctx.run_dir, ctx.model_dir)
    return finish(ctx)


def finish(ctx: TrainContext) -> Run:
    """Curves, calibration and the decision thresholds, the best model's val/test metrics into its
    card, and the report."""
    began = time.time()
    plot_curves(ctx.layout.metrics_csv, ctx.layout.curves)
    clf = Classifier.load(ctx.model_dir)
    task = clf.task
    evaluated = {split: samples for split in ("val", "test") if (samples := getattr(ctx.splits, split))}
    # one pass per split: the val logits also serve calibration, the thresholds and the report, and its
    # features the unknown-score's fit; with --tta auto the same pass reads the second view, which
    # decides the views first, and the test split is read once, with them
    logits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    val_taps = None
    if "val" in evaluated:
        clf, logits["val"], val_taps = read_val(ctx, clf, evaluated["val"])
    elif ctx.cfg.model.tta == AUTO:
        print(f"test-time augmentation (auto): one view ({why_one_view(task.name == 'single', 0)})")
    logits.update({split: clf.logits_of([p for p, _ in samples], ctx.batch_size * 2, ctx.cfg.data.workers)[:2]
                   for split, samples in evaluated.items() if split != "val"})
    val = None
    if "val" in logits:
        z, ok = logits["val"]
        val = (z[ok], task.targets([y for _, y in evaluated["val"]], clf.card.num_classes)[ok])
    calibrate(ctx, clf, val)
    if val is not None:
        tune_decisions(ctx, clf, *val)
    fit_unknown_score(ctx, clf, val_taps)
    metrics: dict[str, Any] = dict(clf.card.metrics)
    val_result = None
    for split, (z, ok) in logits.items():
        result = metrics_of_logits(z, ok, evaluated[split], clf.class_names, task, clf.temperature,
                                   clf.card.thresholds)
        val_result = result if split == "val" else val_result
        metrics[split] = {k: result[k] for k in (*HEADLINE_METRICS, "num_samples") if k in result}
        per_class = result.get("per_class") or result.get("per_label") or {}  # for the README model card
        metrics[split]["per_class"] = {name: {k: m[k] for k in ("precision", "recall", "f1", "support")}
                                       for name, m in per_class.items()}
        print(f"{split}: " + "  ".join(f"{k} {result[k]:.4f}" for k in HEADLINE_METRICS if k in result)
              + f"  ({result['num_samples']} images)")
    write_card(ctx.model_dir, read_card(ctx.model_dir).replace(metrics=metrics))
    write_json(ctx.layout.timings, {k: round(v, 1) for k, v in ctx.timings.items()})  # the report shows them
    write_run_report(ctx, logits.get("val"))
    ctx.timings["finish"] = time.time() - began
    ctx.timings["total"] = time.time() - ctx.started
    write_json(ctx.layout.timings, {k: round(v, 1) for k, v in ctx.timings.items()})
    if ctx.cfg.runtime.logger == "mlflow":
        track(ctx, metrics, val_result)
    if ctx.plan is not None:
        print(f"time budget {format_duration(ctx.plan.budget)}: the command took "
              f"{format_duration(ctx.timings['total'])} (planned {format_duration(ctx.plan.total)})")
    return Run(ctx.run_dir, ctx.model_dir, metrics)


def read_val(ctx: TrainContext, clf: Classifier, samples: list) -> tuple[Classifier, tuple[torch.Tensor, torch.Tensor],
                                                                         Taps | None]:
    """The finish's one pass over the val split (:meth:`~visiontune.inference.classifier.Classifier.view_taps`):
    each view's logits, and the features the unknown-score's fit reads (:func:`~visiontune.training.unknown.sources_of`)
    where it will be fitted. With ``--tta auto`` the pass reads :data:`AUTO_TTA`'s views, and the
    second view is measured against the first (:func:`choose_tta`). Returns the classifier that
    predicts as the card now says, the val logits it predicts (and the mask of readable images), and
    the taps under its views (None where no unknown-score is fitted, or where it fits on a share of
    the val images: a larger split's features are not all kept)."""
    fits = ctx.cfg.model.unknown and len(samples) <= MAX_VAL_IMAGES
    layers = sources_of(clf) if fits else ()
    why = why_one_view(clf.task.name == "single", len(samples)) if ctx.cfg.model.tta == AUTO else ""
    if why:
        print(f"test-time augmentation (auto): one view ({why})")
    measures = ctx.cfg.model.tta == AUTO and not why
    began = time.time()
    per_view, ok = clf.view_taps([p for p, _ in samples], layers, AUTO_TTA if measures else clf.card.tta,
                                 ctx.batch_size * 2, ctx.cfg.data.workers)
    if measures:
        clf, kept = choose_tta(ctx, clf, samples, per_view, ok)
        per_view = per_view if kept else per_view[:1]
    ctx.timings["val"] = time.time() - began  # with --tta auto's second view, and the unknown-score's features
    features, z = mean_of_taps(per_view)
    return clf, (z, ok), ((features, z, ok) if fits else None)


def choose_tta(ctx: TrainContext, clf: Classifier, samples: list, per_view: list, ok: torch.Tensor
               ) -> tuple[Classifier, bool]:
    """``--tta auto`` (:mod:`~visiontune.training.tta_choice`): measure the second view's logits
    (``per_view[1]``) against the image's on the val split, and where it pays write the mode into
    the card. Returns the classifier that predicts as the card now says, and whether the views were
    kept."""
    targets = clf.task.targets([y for _, y in samples], clf.card.num_classes)
    choice = choose_between(per_view[0][1][ok], per_view[1][1][ok], targets[ok], clf.preprocessing.height)
    print(choice.line(), flush=True)
    card = read_card(ctx.model_dir)
    training = {**card.training, "tta_choice": choice.to_dict()}
    write_card(ctx.model_dir, card.replace(training=training, inference={
        **card.inference, **({"tta": choice.mode} if choice.mode else {})}))
    if not choice.mode:
        return clf, False
    return Classifier.load(ctx.model_dir), True  # predicts with the views


OUT_OF_FOLD = "out-of-fold (training images)"  # the calibration source of a cross-validated probe


def calibrate(ctx: TrainContext, clf: Classifier, val: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Fit the model's temperature as its task does (stored in model.json and in ``clf``).

    The temperature is fitted on the out-of-fold logits of the training images when a probe was
    cross-validated (every training image is evidence), else on the validation split (``val``:
    the raw logits of its readable images and their targets). A calibration problem never loses
    the finished run: the temperature stays 1.
    """
    parts = parts_of(clf.task)
    try:
        if ctx.calibration_logits is not None:
            cal = store_calibration(ctx.model_dir, parts.calibrate(*ctx.calibration_logits, source=OUT_OF_FOLD))
        elif val is not None:
            cal = store_calibration(ctx.model_dir, parts.calibrate(*val))
        else:  # no validation images in memory: the run's val split, or why there is none
            cal = calibrate_run(ctx.run_dir, workers=ctx.cfg.data.workers)
        clf.temperature, clf.calibrated = float(cal["temperature"]), True
        print(f"calibration: {parts.calibration_note(cal)}")
    except Exception as exc:
        print(f"warning: calibration skipped ({type(exc).__name__}: {exc}); probabilities are uncalibrated")


def fit_unknown_score(ctx: TrainContext, clf: Classifier, val_taps: Taps | None = None) -> None:
    """The unknown-score (:mod:`visiontune.training.unknown`), fitted on the run's training and val
    images (``val_taps``: the val images' features, read by :func:`read_val`) and stored beside the
    weights; a problem never loses the finished run: the model then answers as before, one of its
    classes for every image."""
    if not ctx.cfg.model.unknown or not ctx.splits.val:
        print("unknown-score: none" + (" (no val split to set its threshold on)" if ctx.cfg.model.unknown else ""))
        return
    began = time.time()
    try:
        fitted = fit_unknown(clf, ctx.splits.train, ctx.splits.val, ctx.cfg.model.threshold_tpr, ctx.batch_size * 2,
                             ctx.cfg.data.workers, ctx.cfg.runtime.seed, val_taps=val_taps)
        store_unknown(ctx.model_dir, fitted)
        clf.card = read_card(ctx.model_dir)
        print(describe(fitted.section))
    except Exception as exc:
        print(f"warning: unknown-score skipped ({type(exc).__name__}: {exc}); the model answers one of its "
              "classes for every image")
    ctx.timings["unknown"] = time.time() - began


def tune_decisions(ctx: TrainContext, clf: Classifier, val_logits: torch.Tensor, val_target: torch.Tensor) -> None:
    """The decision thresholds the model's task tunes on the calibrated val probabilities (a
    multi-label model's per-label thresholds, for max F1; none for argmax), stored in model.json
    and in ``clf``."""
    thresholds, notes = parts_of(clf.task).tune_decisions(clf.task.probabilities(val_logits, clf.temperature),
                                                          val_target)
    card = read_card(ctx.model_dir)
    card = card.replace(inference={**card.inference, **clf.task.card_inference(thresholds)})
    write_card(ctx.model_dir, card)
    clf.card = card
    for line in notes:
        print(line)


def track(ctx: TrainContext, metrics: dict[str, Any], val_result: dict[str, Any] | None) -> None:
    """The finished run into its MLflow run; a tracking problem never loses the finished run."""
    from .mlflow_run import log_run  # lazy: MLflow loads only for --logger mlflow

    try:
        print(f"mlflow: run {ctx.logger.run_id} logged; model {log_run(ctx, metrics, val_result)}")
    except Exception as exc:
        print(f"warning: MLflow logging incomplete ({type(exc).__name__}: {str(exc)[:300]}); the run dir "
              f"{ctx.run_dir} has everything")


def write_run_report(ctx: TrainContext, val_logits: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """RUN/report.html, when asked for; a report problem never loses the finished run."""
    if not ctx.cfg.runtime.report:
        return
    try:
        print(f"report: {write_report(ctx.run_dir, workers=ctx.cfg.data.workers, val_logits=val_logits)}")
    except Exception as exc:
        print(f"warning: report skipped ({type(exc).__name__}: {exc}); run `visiontune report {ctx.run_dir}`")


def write_json(path: Path, values: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(values, indent=2) + "\n")
