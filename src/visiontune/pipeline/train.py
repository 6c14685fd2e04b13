"""``visiontune.train``: data -> model -> strategy -> run dir, then evaluation, calibration and report."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.hardware import is_rank_zero, process_started
from ..core.safe_io import atomic_write_text
from ..data.labels import stack_targets
from ..evaluation.calibration import calibrate_run, calibration_summary, multilabel_calibration, store_calibration
from ..evaluation.evaluate import metrics_of_logits
from ..evaluation.multilabel import MIN_THRESHOLD_SUPPORT, tune_thresholds
from ..evaluation.plots import plot_curves
from ..evaluation.report import write_report
from ..inference.classifier import Classifier
from ..models.artifact import read_card, write_card
from ..training.budget import format_duration
from ..training.config import TrainConfig, read_yaml
from ..training.context import TrainContext
from ..training.setup import fit, setup_run


@dataclass
class Run:
    """The result of :func:`train`: where the run lies and how the best model scored."""

    run_dir: Path
    model_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Classifier:
        """The best model as a :class:`~visiontune.inference.classifier.Classifier`."""
        return Classifier.load(self.model_dir)


def train(data: str | os.PathLike | None = None, **options: Any) -> Run:
    """Fine-tune a pretrained classifier on a folder of labelled images.

    Args:
        data: ``DATA/<class>/*``, ``DATA/{train,val[,test]}/<class>/*`` or a ``path,label`` CSV.
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
    return run_training(TrainConfig.from_dict(values))


def run_training(cfg: TrainConfig) -> Run:
    """The whole ``train`` command: set up, fit, then evaluate, calibrate and report (rank 0)."""
    ctx = setup_run(cfg)
    ctx.timings["start"] = time.time() - process_started()
    began = time.time()
    fit(ctx)
    ctx.timings["train"] = time.time() - began - ctx.timings.get("features", 0.0)
    if not is_rank_zero():  # other DDP ranks only train; rank 0 evaluates and writes
        return Run(ctx.run_dir, ctx.model_dir)
    return finish(ctx)


def finish(ctx: TrainContext) -> Run:
    """Curves, the best model's val/test metrics into its card, calibration and the report."""
    began = time.time()
    plot_curves(ctx.layout.metrics_csv, ctx.layout.curves)
    clf = Classifier.load(ctx.model_dir)
    metrics: dict[str, Any] = dict(clf.card.metrics)
    val_logits, val_result = None, None
    for split in ("val", "test"):
        samples = getattr(ctx.splits, split)
        if samples:  # one pass: the val logits also serve calibration, thresholds and the report
            logits, ok, _ = clf.logits_of([p for p, _ in samples], ctx.batch_size * 2, ctx.cfg.data.workers)
            if split == "val":
                val_logits = (logits, ok)
                if clf.multi_label:
                    calibrate_multilabel(ctx, clf, logits[ok], stack_targets([y for _, y in samples])[ok])
            result = metrics_of_logits(logits, ok, samples, clf.class_names, clf.temperature,
                                       thresholds=clf.thresholds)
            val_result = result if split == "val" else val_result
            metrics[split] = {k: result[k] for k in (*HEADLINE_METRICS, "num_samples") if k in result}
            per_class = result.get("per_class") or result.get("per_label") or {}  # for the README model card
            metrics[split]["per_class"] = {name: {k: m[k] for k in ("precision", "recall", "f1", "support")}
                                           for name, m in per_class.items()}
            print(f"{split}: " + "  ".join(f"{k} {result[k]:.4f}" for k in HEADLINE_METRICS if k in result)
                  + f"  ({result['num_samples']} images)")
    write_card(ctx.model_dir, read_card(ctx.model_dir).replace(metrics=metrics))
    write_json(ctx.layout.timings, {k: round(v, 1) for k, v in ctx.timings.items()})  # the report shows them
    if clf.multi_label:  # calibrated above, before its thresholds were tuned
        write_run_report(ctx, val_logits)
    else:
        report_and_calibrate(ctx, val_logits)
    ctx.timings["finish"] = time.time() - began
    ctx.timings["total"] = time.time() - process_started()
    write_json(ctx.layout.timings, {k: round(v, 1) for k, v in ctx.timings.items()})
    if ctx.cfg.runtime.logger == "mlflow":
        track(ctx, metrics, val_result)
    if ctx.plan is not None:
        print(f"time budget {format_duration(ctx.plan.budget)}: the command took "
              f"{format_duration(ctx.timings['total'])} (planned {format_duration(ctx.plan.total)})")
    return Run(ctx.run_dir, ctx.model_dir, metrics)


HEADLINE_METRICS = ("accuracy", "macro_f1", "top5_accuracy", "macro_map", "micro_map", "micro_f1")


def calibrate_multilabel(ctx: TrainContext, clf: Classifier, val_logits: torch.Tensor,
                         val_target: torch.Tensor) -> None:
    """A multi-label model's temperature (every label decision on val), then its per-label thresholds
    tuned for max F1 on the calibrated val probabilities; both stored in model.json and in ``clf``."""
    try:
        cal = store_calibration(ctx.model_dir, multilabel_calibration(val_logits, val_target))
        clf.temperature, clf.calibrated = float(cal["temperature"]), True
        print(f"calibration: temperature {clf.temperature:.3f} over {val_target.numel()} val label decisions, ECE "
              f"{cal['ece_before']:.3f} -> {cal['ece_after']:.3f}")
    except Exception as exc:  # a calibration problem must never lose a finished run: T stays 1
        print(f"warning: calibration skipped ({type(exc).__name__}: {exc}); probabilities are uncalibrated")
    thresholds = tune_thresholds(torch.sigmoid(val_logits.float() / clf.temperature), val_target)
    card = read_card(ctx.model_dir)
    write_card(ctx.model_dir, card.replace(inference={**card.inference, "thresholds": thresholds}))
    clf.thresholds = thresholds
    own = sum(1 for c in range(val_target.shape[1]) if int(val_target[:, c].sum()) >= MIN_THRESHOLD_SUPPORT)
    print(f"thresholds: tuned on val for max F1, {own} of {len(thresholds)} label(s) with their own (the others, "
          f"with < {MIN_THRESHOLD_SUPPORT} val images, share one); stored in model.json, predict --threshold "
          "overrides them")


def track(ctx: TrainContext, metrics: dict[str, Any], val_result: dict[str, Any] | None) -> None:
    """The finished run into its MLflow run; a tracking problem never loses the finished run."""
    from .tracking import log_run  # lazy: MLflow loads only for --logger mlflow

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


def report_and_calibrate(ctx: TrainContext, val_logits: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Fit temperature scaling (stored in model.json) and write RUN/report.html.

    The temperature is fitted on the out-of-fold logits of the training images when a probe was
    cross-validated (every training image is evidence), else on the validation split.
    """
    workers = ctx.cfg.data.workers
    try:
        if ctx.calibration_logits is not None:
            store_calibration(ctx.model_dir, calibration_summary(*ctx.calibration_logits,
                                                                 source="out-of-fold (training images)"))
        elif val_logits is not None:
            logits, ok = val_logits
            labels = torch.tensor([y for _, y in ctx.splits.val], dtype=torch.long)
            calibrate_run(ctx.run_dir, logits=logits[ok], labels=labels[ok])
        else:
            calibrate_run(ctx.run_dir, workers=workers)
        if ctx.cfg.runtime.report:
            print(f"report: {write_report(ctx.run_dir, workers=workers, val_logits=val_logits)}")
        cal = read_card(ctx.model_dir).calibration
        if cal:
            where = "out-of-fold" if str(cal.get("source", "")).startswith("out-of-fold") else "val"
            print(f"calibration: temperature {cal['temperature']:.3f}, {where} ECE {cal['ece_before']:.3f} -> "
                  f"{cal['ece_after']:.3f}")
    except Exception as exc:  # a report problem must never lose a finished training run
        print(f"warning: report/calibration skipped ({type(exc).__name__}: {exc}); "
              f"run `visiontune report {ctx.run_dir}`")


def write_json(path: Path, values: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(values, indent=2) + "\n")
