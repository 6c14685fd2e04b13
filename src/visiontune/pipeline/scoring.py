"""``predict`` and ``evaluate``: a trained model applied to images, each with its options defined once.

:class:`PredictOptions` and :class:`EvaluateOptions` are the commands' flags (generated from
them), the keywords of :func:`predict` and :func:`evaluate`, and their YAML.

Example:
    >>> sorted(PredictOptions.from_dict({"top_k": 3}).to_dict())[:4]
    ['backend', 'batch_size', 'csv_safe', 'explain']
    >>> PredictOptions.from_dict({"topk": 3})
    Traceback (most recent call last):
    ...
    visiontune.core.errors.ConfigError: unknown option 'topk'; did you mean 'top_k'?
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..core.options import CommandOptions, option
from ..core.registry import BACKENDS, PRECISIONS
from ..core.safe_io import atomic_write_text
from ..models.tta import TTA_MODES

_positive = (lambda v: v >= 1, "must be >= 1")
_optional_count = (lambda v: v is None or v >= 0, "must be >= 0")
_probability = (lambda v: v is None or 0.0 <= v <= 1.0, "must be in [0, 1]")


def _backend_default() -> str:
    return os.environ.get("VISIONTUNE_BACKEND", "auto")


@dataclass
class BatchOptions(CommandOptions):
    """How images are read in batches: the options of every command that runs a model over images."""

    batch_size: int = option(64, "images per batch (64)", check=_positive)
    workers: int | None = option(None, "decoding processes (default: one per core; 0: in this process)",
                                 check=_optional_count)


@dataclass
class LoaderOptions(BatchOptions):
    """How a model runs over images: the options predict and evaluate share."""

    precision: str = option("auto", "inference precision", choices=PRECISIONS)
    backend: str = option("auto", "CPU runtime of a model folder (default: $VISIONTUNE_BACKEND, else auto)",
                          choices=BACKENDS, default_factory=_backend_default)


@dataclass
class PredictOptions(LoaderOptions):
    """Every option of ``visiontune predict`` and :func:`predict`."""

    top_k: int = option(5, "labels/probabilities per image (5)", metavar="K", check=_positive)
    out: str | None = option(None, "write FILE.csv or FILE.json instead of CSV on stdout", metavar="FILE")
    explain: bool = option(False, "also write a Grad-CAM overlay PNG per input (next to --out, in gradcam/)")
    resume: bool = option(False, "with --out FILE.csv: skip inputs already written")
    csv_safe: bool = option(False, "prefix CSV cells starting with = + - @ with ' so spreadsheets show them as "
                                   "text, not formulas (file or class names from strangers)")
    processes: int = option(1, "with --out FILE.csv: shard inputs over N processes (output order unchanged)",
                            check=_positive)
    reject_below: float | None = option(None, "label 'unknown' when the (calibrated) top probability is below P "
                                              "(single-label models)", metavar="P", check=_probability)
    threshold: float | None = option(None, "multi-label models: every label with probability >= P (default: the "
                                           "per-label thresholds tuned on val, in model.json)", metavar="P",
                                     check=_probability)
    label_delim: str = option(" ", "multi-label models: separator of the labels in the CSV's labels column "
                                   "(a space)", metavar="SEP")
    label_studio: str | None = option(None, "with --out FILE.json: write Label Studio tasks with the answers as "
                                            "predictions to import (images under ROOT, the folder Label Studio "
                                            "serves as local files, as /data/local-files/ URLs), and FILE.xml, the "
                                            "labelling config they fit", metavar="ROOT")
    threshold_tpr: float | None = option(None, "answer 'unknown' below the unknown-score that accepts this share "
                                               "of the model's known val images (default: the threshold set at "
                                               "training, 0.95)", metavar="X",
                                         check=(lambda v: v is None or 0 < v <= 1, "must be in (0, 1]"))

    @property
    def streams_csv(self) -> bool:
        """Rows go to a CSV file as they are made (incremental, resumable, shardable)."""
        return bool(self.out) and not str(self.out).endswith(".json")


@dataclass
class EvaluateOptions(LoaderOptions):
    """Every option of ``visiontune evaluate`` and :func:`evaluate`."""

    label_delim: str = option(" ", "multi-label CSVs: separator of the labels in one cell (a space)", metavar="SEP")
    save: bool = option(True, "write confusion_matrix.png / misclassified.csv")
    out: str | None = option(None, "folder for confusion_matrix.png / misclassified.csv (default: next to the "
                                   "model)", metavar="DIR")
    tta: str | None = option(None, "test-time augmentation, the views each prediction averages (default: as the "
                                   "model was trained)", choices=TTA_MODES)
    unknown: str | None = option(None, "images of no class the model knows (a folder or glob): measure how well its "
                                       "unknown-score rejects them (AUROC, FPR at 95% TPR, accuracy/coverage)",
                                 metavar="DIR")


@dataclass
class Predictions:
    """What :func:`predict` made: the rows (None when they were streamed to ``out``), the images
    predicted and the unreadable ones among them, and where they were written."""

    rows: list[dict[str, Any]] | None
    predicted: int
    unreadable: int
    out: str | None
    class_names: list[str] | None = None  # with the rows: their columns
    task: Any = None
    unknown: bool = False  # the rows carry the model's unknown-score


def predict(model: str | os.PathLike, inputs: Sequence[str], log: Callable[[str], None] = print,
            **options: Any) -> Predictions:
    """Classify image files, folders (recursive) or glob patterns: the ``predict`` command.

    Args:
        model: run dir, model/ dir, pruned model dir, exported .onnx or OpenVINO model.
        inputs: files, folders or glob patterns.
        log: where progress lines go (the CLI: stderr).
        **options: any :class:`PredictOptions` by name, e.g. ``top_k=3``, ``out="preds.csv"``.

    Returns:
        :class:`Predictions`; with ``out`` the rows are in that file (CSV streamed, or JSON).

    Example:
        >>> predict("runs/train-1", ["photos/"], top_k=1).rows[0]["label"]  # doctest: +SKIP
        'ants'
    """
    from ..evaluation.gradcam import explain  # lazy: torch loads only to predict
    from ..export.runtime import prepare_for
    from ..inference.bulk import predict_to_csv
    from ..inference.classifier import Classifier, expand_inputs

    opts = PredictOptions.from_dict(options)
    files = expand_inputs([str(i) for i in inputs])
    if not files:
        raise ConfigError(f"no input files found in {list(inputs)}")
    if opts.label_studio is not None and not str(opts.out or "").endswith(".json"):
        raise ConfigError("--label-studio writes Label Studio tasks to a JSON file: add --out FILE.json")
    if opts.explain or opts.threshold is not None or opts.reject_below is not None or opts.threshold_tpr is not None:
        reference = Classifier.load(model, precision="32")  # eager fp32: what Grad-CAM differentiates
        reference.decision_thresholds(opts.reject_below, opts.threshold)  # refused before any output file
        reference.move_unknown_threshold(opts.threshold_tpr)
        if opts.explain:
            cam_dir = (Path(opts.out).parent if opts.out else Path(".")) / "gradcam"
            written = explain(reference, files, cam_dir)
            log(f"wrote {len(written)} Grad-CAM overlay(s) to {cam_dir}")
    sharded = opts.processes > 1 and opts.streams_csv  # shards run eager PyTorch
    backend = "eager" if sharded else opts.backend
    prepare_for(model, opts.precision, backend, log=log)
    if opts.streams_csv:
        n, bad = predict_to_csv(str(model), files, Path(opts.out), opts.top_k, opts.batch_size, opts.workers,
                                opts.precision, opts.reject_below, opts.resume, opts.processes, opts.threshold,
                                opts.label_delim, opts.csv_safe, backend=backend, unknown_tpr=opts.threshold_tpr)
        return Predictions(None, n - bad, bad, opts.out)
    clf = Classifier.load(model, precision=opts.precision, backend=opts.backend)
    clf.move_unknown_threshold(opts.threshold_tpr)
    rows = clf.predict(files, top_k=opts.top_k, batch_size=opts.batch_size, workers=opts.workers,
                       progress=sys.stderr.isatty(), reject_below=opts.reject_below, threshold=opts.threshold)
    bad = sum(1 for r in rows if r["error"])
    result = Predictions(rows, len(rows) - bad, bad, opts.out, list(clf.class_names), clf.task,
                         clf.unknown_threshold is not None)
    if opts.label_studio is not None:
        from ..data.label_studio import label_config, prediction_tasks

        name = clf.card.architecture.name if clf.card.architecture else "model"
        tasks = prediction_tasks(rows, Path(opts.label_studio), f"visiontune {name}")
        atomic_write_text(Path(opts.out), json.dumps(tasks, indent=1) + "\n")
        config = Path(opts.out).with_suffix(".xml")
        atomic_write_text(config, label_config(clf.class_names, multiple=clf.task.decisions_per_image(
            len(clf.class_names)) > 1))
        log(f"wrote {len(tasks)} Label Studio task(s) ({sum('predictions' in t for t in tasks)} with a prediction); "
            f"create the project with the labelling config in {config}")
    elif opts.out:  # a .json file (a CSV was streamed above)
        atomic_write_text(Path(opts.out), json.dumps(rows, indent=1) + "\n")
    return result


def predictions_csv(result: Predictions, top_k: int, label_delim: str = " ", csv_safe: bool = False) -> str:
    """The rows of ``result`` as the predictions CSV (what ``predict`` prints without ``--out``)."""
    from ..inference.rows import csv_cells, csv_header

    if result.rows is None or result.class_names is None:
        raise ValueError("the predictions were streamed to a file; there are no rows to format")
    k = min(top_k, len(result.class_names))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(csv_header(k, result.class_names, task=result.task, unknown=result.unknown))
    writer.writerows(csv_cells(r, k, result.class_names, label_delim, csv_safe, task=result.task,
                               unknown=result.unknown) for r in result.rows)
    return buf.getvalue()


def evaluate(model: Any, data: str | os.PathLike, log: Callable[[str], None] = print,
             **options: Any) -> dict[str, Any]:
    """Score a trained model on labelled images: the ``evaluate`` command.

    Args:
        model: a run dir, model/ dir, pruned model dir, exported .onnx / OpenVINO model, or a loaded
            :class:`~visiontune.inference.classifier.Classifier`.
        data: class folders, a train/val/test layout (uses test, else val) or a CSV.
        log: where the runtime's lines go.
        **options: any :class:`EvaluateOptions` by name, e.g. ``save=False``, ``tta="none"``.

    Returns:
        The metrics (see :func:`visiontune.evaluation.evaluate.evaluate`).

    Example:
        >>> evaluate("runs/train-1", "data/test", save=False)["accuracy"]  # doctest: +SKIP
        0.97
    """
    from ..data.scan import require_data
    from ..evaluation.evaluate import evaluate as score  # lazy: as above
    from ..export.runtime import load_classifier
    from ..inference.classifier import Classifier

    if isinstance(options.get("tta"), bool):  # the on/off switch of earlier releases: flip or none
        options["tta"] = "flip" if options["tta"] else "none"
    opts = EvaluateOptions.from_dict(options)
    require_data(data)  # before the model and its runtime measurement: a wrong path fails at once
    clf = model if isinstance(model, Classifier) else load_classifier(model, opts.precision, opts.tta, opts.backend,
                                                                      log=log)
    return score(clf, data, batch_size=opts.batch_size, workers=opts.workers, save=opts.save,
                 label_delim=opts.label_delim, out=opts.out, unknown=opts.unknown)
