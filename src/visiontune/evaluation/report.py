"""``visiontune report RUN [--data DIR]`` -> ``RUN/report.html``: one self-contained HTML file.

Sections: dataset summary, augmented training / validation samples, training curves, final
metrics, per-class table, confusion matrix, most-confused pairs, misclassified and top-loss
galleries, Grad-CAM, calibration, accuracy/coverage trade-off, and the strategy comparison when
``RUN/compare.csv`` exists. A multi-label model gets its own sections instead
(:mod:`~visiontune.evaluation.report_multilabel`). No external requests: CSS is inline, images are data URIs.
"""

from __future__ import annotations

import html
import json
import os
import random
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image

from ..core.errors import ImageDecodeError
from ..core.layout import SPLITS, RunLayout
from ..core.safe_io import atomic_write_text
from ..data.image import load_image
from ..data.labels import label_counts, label_names, stack_targets
from ..data.scan import discover_eval, read_split_csv
from ..data.transforms import denormalize, eval_transform, train_transform
from ..inference.classifier import Classifier
from ..inference.rows import probabilities
from . import report_sections as rs
from .calibration import (
    calibrate_run,
    calibration_summary,
    expected_calibration_error,
    reliability_diagram,
    store_calibration,
)
from .evaluate import compute_metrics
from .gradcam import gradcam_overlays
from .plots import plot_curves
from .report_multilabel import multilabel_sections

SECTIONS = {
    "dataset": "Dataset summary",
    "samples": "Training and validation samples",
    "curves": "Training curves",
    "metrics": "Final metrics",
    "per-class": "Per-class precision, recall and F1",
    "confusion": "Confusion matrix",
    "confused-pairs": "Most-confused class pairs",
    "errors": "Misclassified and top-loss images",
    "gradcam": "Grad-CAM",
    "calibration": "Calibration",
    "coverage": "Accuracy vs coverage",
    "compare": "Strategy comparison",
    "time": "Time: planned and actual",
}
# a multi-label model's report has these in place of per-class, confusion, errors and coverage
MULTI_LABEL_SECTIONS = {
    "per-label": "Per-label average precision, thresholds, precision, recall and F1",
    "label-pairs": "Most confused and co-missed label pairs",
    "label-errors": "False positives and false negatives per label",
}
TITLES = {**SECTIONS, **MULTI_LABEL_SECTIONS}
GALLERY_SIZE = 24
GRADCAM_PER_KIND = 6
SIZE_SAMPLE = 300


def write_report(run_dir: str | os.PathLike, data: str | os.PathLike | None = None, batch_size: int = 32,
                 workers: int | None = None, gradcam: bool = True, seed: int = 0,
                 val_logits: tuple[torch.Tensor, torch.Tensor] | None = None) -> Path:
    """Write ``RUN/report.html`` and return its path.

    Args:
        run_dir: a run dir from ``visiontune train``.
        data: labelled folder/CSV to evaluate on instead of the run's validation split.
        gradcam: include Grad-CAM overlays (needs the ``grad-cam`` package).
        val_logits: the model's raw logits on the run's validation split and the mask of the
            readable images, when the caller already has them (``train`` does): no second pass.

    Example:
        write_report("runs/train-1")
        # -> PosixPath('runs/train-1/report.html')
    """
    start = time.perf_counter()
    layout = RunLayout(run_dir)
    run_dir = layout.root
    clf = Classifier.load(run_dir)
    names = clf.class_names
    cfg = _read_config(layout)
    splits = {s: read_split_csv(layout.split_csv(s), names) for s in SPLITS if layout.split_csv(s).is_file()}
    if data is not None:
        samples, eval_skipped = discover_eval(data, names, clf.card.task)
        source = f"data {data}"
    else:
        samples, eval_skipped = splits.get("val", []), []
        source = "validation split"
    paths = [p for p, _ in samples]
    logits, ok = val_logits if (val_logits is not None and data is None) else clf.logits_of(paths, batch_size,
                                                                                             workers)[:2]
    kept = [p for p, good in zip(paths, ok.tolist()) if good]
    target = stack_targets([y for _, y in samples], len(names) if clf.multi_label else None)[ok]
    logits = logits[ok]
    all_files = [p for items in splits.values() for p, _ in items]
    skipped = _read_skipped(layout) + [f"{p}\t{r}" for p, r in eval_skipped]
    counts = {s: {n: int(c) for n, c in zip(names, label_counts([y for _, y in items], len(names)))}
              for s, items in splits.items()}
    parts: list[tuple[str, str]] = [
        ("dataset", rs.dataset_section(counts, _image_sizes(all_files, seed), skipped, names)),
        ("samples", _samples_section(clf, splits, cfg.get("augment", "standard"), seed)),
        ("curves", _curves_section(layout))]
    if clf.multi_label:
        parts += multilabel_sections(clf, run_dir, kept, logits, target, source, gradcam, seed, batch_size, workers,
                                     data is None)
    else:
        parts += _single_label_sections(clf, run_dir, kept, logits, target, source, gradcam, seed, batch_size,
                                        workers, data is None)
    if layout.compare_csv.is_file():
        parts.append(("compare", rs.compare_section(layout.compare_csv)))
    if layout.plan.is_file() or layout.timings.is_file():
        parts.append(("time", rs.time_section(_read_json(layout.plan), _read_json(layout.timings))))

    title = f"visiontune report: {run_dir.name}"
    arch = clf.card.architecture
    nav = " ".join(f'<a href="#{sid}">{html.escape(TITLES[sid])}</a>' for sid, _ in parts)
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{rs.CSS}</style></head><body><header><h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(str(arch.requested or arch.name) if arch else '')} &middot; {len(names)} classes "
            f"&middot; evaluated on the {html.escape(source)} &middot; generated "
            f"{datetime.now().strftime('%Y-%m-%d %H:%M')} in {{seconds}} s</p><nav>{nav}</nav></header><main>"
            + "\n".join(rs.section(sid, TITLES[sid], body) for sid, body in parts) + "</main></body></html>\n")
    return atomic_write_text(layout.report, page.replace("{seconds}", f"{time.perf_counter() - start:.0f}"))


def _single_label_sections(clf: Classifier, run_dir: Path, kept: list[str], logits: torch.Tensor,
                           target: torch.Tensor, source: str, gradcam: bool, seed: int, batch_size: int,
                           workers: int | None, own_val: bool) -> list[tuple[str, str]]:
    """Metrics, per-class, confusion, errors, Grad-CAM, calibration and coverage of a single-label model."""
    names = clf.class_names
    cal = clf.card.calibration
    if cal is None:
        if own_val and len(target):
            cal = store_calibration(run_dir, calibration_summary(logits, target))
        else:
            cal = calibrate_run(run_dir, batch_size, workers)
    temperature = float(cal.get("temperature", 1.0))
    raw_probs = probabilities(logits.double(), 1.0)
    probs = probabilities(logits.double(), temperature)
    result = compute_metrics(probs.float(), target, names) if len(target) else None

    parts: list[tuple[str, str]] = []
    if result is None:
        parts.append(("metrics", '<p class="warn">no readable labelled images to evaluate</p>'))
    else:
        training = {k: v for k, v in clf.card.training.items() if not isinstance(v, (dict, list))}
        parts.append(("metrics", rs.metrics_section(clf.card.metrics, result, source, training)))
        parts.append(("per-class", rs.per_class_section(result)))
        parts.append(("confusion", rs.confusion_section(result["confusion_matrix"], names)))
        parts.append(("confused-pairs", rs.confused_pairs_section(result["confusion_matrix"], names)))
        parts.append(("errors", _errors_section(kept, target, probs, names)))
        if gradcam:
            parts.append(("gradcam", _gradcam_section(clf, kept, target, probs, names, seed)))
        diagram = run_dir / ".reliability.png"
        reliability_diagram(raw_probs, target, diagram, probs_after=probs, title=f"{source}, T = {temperature:.3f}")
        uri = rs.file_uri(diagram)
        diagram.unlink(missing_ok=True)
        eval_ece = (expected_calibration_error(raw_probs, target), expected_calibration_error(probs, target))
        parts.append(("calibration", rs.calibration_section(cal, uri, eval_ece)))
        parts.append(("coverage", rs.coverage_section(probs.numpy(), target.numpy())))
    return parts


def _read_config(layout: RunLayout) -> dict[str, Any]:
    try:
        return yaml.safe_load(layout.config.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text())
        return values if isinstance(values, dict) else {}
    except (OSError, ValueError):
        return {}


def _read_skipped(layout: RunLayout) -> list[str]:
    path = layout.skipped
    return [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _image_sizes(paths: list[str], seed: int) -> list[tuple[int, int]]:
    sample = random.Random(seed).sample(paths, min(SIZE_SAMPLE, len(paths)))
    sizes = []
    for p in sample:
        try:
            with Image.open(p) as img:  # header only: no pixel decoding
                sizes.append(img.size)
        except OSError:
            continue
    return sizes


def _samples_section(clf: Classifier, splits: dict, augment: str, seed: int, count: int = 16) -> str:
    pre, names = clf.preprocessing, clf.class_names
    body = ""
    torch.manual_seed(seed)
    for split, transform, what in (("train", train_transform(pre, augment), f"augmented training samples "
                                    f"(augment={augment}: what the model saw)"),
                                   ("val", eval_transform(pre), "validation samples (eval preprocessing)")):
        items = splits.get(split, [])
        chosen = random.Random(seed).sample(items, min(count, len(items)))
        images, captions = [], []
        for path, label in chosen:
            try:
                images.append(denormalize(transform(load_image(path)), pre))
                captions.append((" ".join(label_names(label, names)) or "(no label)")[:18])
            except ImageDecodeError:
                continue
        body += f"<h3>{html.escape(what.capitalize())}</h3>"
        body += rs.img_tag(rs.grid_uri(images, captions), what) if images else '<p class="muted">none</p>'
    return body


def _curves_section(layout: RunLayout) -> str:
    curves = layout.curves
    if not curves.is_file() and layout.metrics_csv.is_file():
        tmp = layout.root / ".curves.png"
        if plot_curves(layout.metrics_csv, tmp):
            uri = rs.file_uri(tmp)
            tmp.unlink(missing_ok=True)
            return rs.img_tag(uri, "training curves")
    if curves.is_file():
        return rs.img_tag(rs.file_uri(curves), "training curves")
    return '<p class="muted">no metrics.csv in this run</p>'


def _caption(path: str, true: int, pred: int, p: float, names: list[str]) -> str:
    return f"{Path(path).name}: true {names[true]}, predicted {names[pred]} ({p:.2f})"


def _errors_section(paths: list[str], target: torch.Tensor, probs: torch.Tensor, names: list[str]) -> str:
    pred = probs.argmax(1)
    conf = probs.max(1).values
    loss = -torch.log(probs[torch.arange(len(target)), target].clamp_min(1e-12))
    wrong = [i for i in torch.argsort(conf, descending=True).tolist() if pred[i] != target[i]]

    def items(indices):
        out = []
        for i in indices[:GALLERY_SIZE]:
            uri = rs.thumb_uri(paths[i])
            if uri:
                out.append((uri, _caption(paths[i], int(target[i]), int(pred[i]), float(conf[i]), names)
                            + f", loss {float(loss[i]):.2f}", bool(pred[i] != target[i])))
        return out

    top_loss = torch.argsort(loss, descending=True).tolist()
    return (f"<h3>Misclassified ({len(wrong)} of {len(target)}; most confident first)</h3>" + rs.gallery(items(wrong))
            + "<h3>Top-loss images (highest cross-entropy of the true class)</h3>" + rs.gallery(items(top_loss)))


def _gradcam_section(clf: Classifier, paths: list[str], target: torch.Tensor, probs: torch.Tensor,
                     names: list[str], seed: int) -> str:
    pred = probs.argmax(1)
    rng = random.Random(seed)
    right = [i for i in range(len(target)) if pred[i] == target[i]]
    wrong = [i for i in range(len(target)) if pred[i] != target[i]]
    chosen = rng.sample(right, min(GRADCAM_PER_KIND, len(right))) + rng.sample(wrong, min(GRADCAM_PER_KIND, len(wrong)))
    images, kept = [], []
    for i in chosen:
        try:
            images.append(load_image(paths[i]))
            kept.append(i)
        except ImageDecodeError:
            continue
    if not images:
        return '<p class="muted">no images</p>'
    overlays = gradcam_overlays(clf, images)
    items = [(rs.image_uri(ov, max_side=224, fmt="PNG"),
              _caption(paths[i], int(target[i]), int(pred[i]), float(probs[i, pred[i]]), names),
              bool(pred[i] != target[i]))
             for i, ov in zip(kept, overlays)]
    return ("<p>Heatmap of the evidence for the predicted class over the input as the model sees it "
            "(resized and cropped). Correct predictions first, then errors (red captions).</p>" + rs.gallery(items))
