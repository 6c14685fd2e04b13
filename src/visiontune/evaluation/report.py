"""``visiontune report RUN [--data DIR]`` -> ``RUN/report.html``: one self-contained HTML file.

Sections: dataset summary, augmented training / validation samples, training curves, final
metrics, per-class table, confusion matrix, most-confused pairs, misclassified and top-loss
galleries, Grad-CAM, calibration, accuracy/coverage trade-off, and the strategy comparison when
``RUN/compare.csv`` exists. The sections between the training curves and the comparison are the
model's task's own (:func:`~visiontune.evaluation.parts.parts_of`: a multi-label model's are in
:mod:`~visiontune.evaluation.report_multilabel`). No external requests: CSS is inline, images are data URIs.
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

from ..core.layout import SPLITS, RunLayout
from ..core.safe_io import atomic_write_text
from ..data.image import readable
from ..data.scan import discover_eval, read_split_csv
from ..data.transforms import denormalize, eval_transform, train_transform
from ..inference.classifier import Classifier
from . import report_sections as rs
from .calibration import store_calibration
from .evaluate import calibrate_run
from .parts import parts_of
from .plots import plot_curves

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
    "unknown": "Images of no known class",
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
SIZE_SAMPLE = 300


def write_report(run_dir: str | os.PathLike, data: str | os.PathLike | None = None, batch_size: int = 32,
                 workers: int | None = None, gradcam: bool = True, seed: int = 0,
                 val_logits: tuple[torch.Tensor, torch.Tensor] | None = None,
                 unknown: str | os.PathLike | None = None) -> Path:
    """Write ``RUN/report.html`` and return its path.

    Args:
        run_dir: a run dir from ``visiontune train``.
        data: labelled folder/CSV to evaluate on instead of the run's validation split.
        gradcam: include Grad-CAM overlays (needs the ``grad-cam`` package).
        val_logits: the model's raw logits on the run's validation split and the mask of the
            readable images, when the caller already has them (``train`` does): no second pass.
        unknown: images of no class the model knows: the unknown-score's section (its measures, the
            most confidently accepted of these images and the most doubted evaluated ones).

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
        samples, eval_skipped = discover_eval(data, names, clf.task)
        source = f"data {data}"
    else:
        samples, eval_skipped = splits.get("val", []), []
        source = "validation split"
    paths = [p for p, _ in samples]
    logits, ok = val_logits if (val_logits is not None and data is None) else clf.logits_of(paths, batch_size,
                                                                                             workers)[:2]
    kept = [p for p, good in zip(paths, ok.tolist()) if good]
    task = clf.task
    target = task.targets([y for _, y in samples], len(names))[ok]
    logits = logits[ok]
    all_files = [p for items in splits.values() for p, _ in items]
    skipped = _read_skipped(layout) + [f"{p}\t{r}" for p, r in eval_skipped]
    counts = {s: {n: int(c) for n, c in zip(names, task.counts([y for _, y in items], len(names)))}
              for s, items in splits.items()}
    sections: list[tuple[str, str]] = [
        ("dataset", rs.dataset_section(counts, _image_sizes(all_files, seed), skipped, names)),
        ("samples", _samples_section(clf, splits, cfg.get("augment", "standard"), seed)),
        ("curves", _curves_section(layout))]
    calibration = _calibration(clf, run_dir, logits, target, data is None, batch_size, workers)
    sections += parts_of(task).report_sections(rs.ReportInputs(clf, run_dir, kept, logits, target, source, gradcam,
                                                               seed, calibration))
    if unknown is not None:
        sections.append(("unknown", _unknown_section(clf, samples, unknown, batch_size, workers)))
    if layout.compare_csv.is_file():
        sections.append(("compare", rs.compare_section(layout.compare_csv)))
    if layout.plan.is_file() or layout.timings.is_file():
        sections.append(("time", rs.time_section(_read_json(layout.plan), _read_json(layout.timings))))

    title = f"visiontune report: {run_dir.name}"
    arch = clf.card.architecture
    nav = " ".join(f'<a href="#{sid}">{html.escape(TITLES[sid])}</a>' for sid, _ in sections)
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{rs.CSS}</style></head><body><header><h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(str(arch.requested or arch.name) if arch else '')} &middot; {len(names)} classes "
            f"&middot; evaluated on the {html.escape(source)} &middot; generated "
            f"{datetime.now().strftime('%Y-%m-%d %H:%M')} in {{seconds}} s</p><nav>{nav}</nav></header><main>"
            + "\n".join(rs.section(sid, TITLES[sid], body) for sid, body in sections) + "</main></body></html>\n")
    return atomic_write_text(layout.report, page.replace("{seconds}", f"{time.perf_counter() - start:.0f}"))


def _unknown_section(clf: Classifier, samples: list, unknown: str | os.PathLike, batch_size: int,
                     workers: int | None, shown: int = 12) -> str:
    """The unknown-score's measures (:func:`~visiontune.evaluation.evaluate.unknown_of`) and two
    galleries: the unknown images it scored most like the training images, and the known ones
    it scored least like them."""
    from ..inference.classifier import expand_inputs
    from .evaluate import unknown_of
    from .unknown_metrics import format_unknown

    files = [f for f in expand_inputs([str(unknown)]) if Path(f).is_file()]
    if clf.unknown_threshold is None or not files:
        why = "the model has no unknown-score (trained with --no-unknown)" if clf.unknown_threshold is None \
            else f"no images found in {unknown}"
        return f'<p class="muted">{html.escape(why)}</p>'
    known_out, known_ok, _ = clf.outputs_of([p for p, _ in samples], batch_size, workers)
    unk_out, unk_ok, _ = clf.outputs_of(files, batch_size, workers)
    measured = unknown_of(clf, samples, files, known=(known_out, known_ok), strangers=(unk_out, unk_ok))
    known = sorted(zip(clf.split(known_out[known_ok])[1].tolist(), [p for (p, _), g in zip(samples, known_ok) if g]))
    accepted = sorted(zip(clf.split(unk_out[unk_ok])[1].tolist(), [f for f, g in zip(files, unk_ok) if g]),
                      reverse=True)
    t = clf.unknown_threshold

    def items(rows, known_images: bool):  # a wrong answer: an accepted unknown, a rejected known image
        return [(uri, f"score {s:.4g}" + (" (accepted)" if s >= t else " (unknown)"), (s < t) == known_images)
                for s, p in rows[:shown] if (uri := rs.thumb_uri(p))]

    return (f"<pre>{html.escape(format_unknown(measured))}</pre>"
            f"<h3>Unknown images most like the training images</h3>{rs.gallery(items(accepted, False))}"
            f"<h3>Known images least like the training images</h3>{rs.gallery(items(known, True))}")


def _calibration(clf: Classifier, run_dir: Path, logits: torch.Tensor, target: torch.Tensor, on_val: bool,
                 batch_size: int, workers: int | None) -> dict[str, Any]:
    """The model's calibration entry; fitted and stored first when ``model.json`` has none: on these
    logits when they are the run's validation split's, else on that split."""
    if clf.card.calibration is not None:
        return clf.card.calibration
    if on_val and len(target):
        return store_calibration(run_dir, parts_of(clf.task).calibrate(logits, target))
    return calibrate_run(run_dir, batch_size, workers)


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
        # an HTML gallery of small PNGs, not a matplotlib grid: drawing 16 subplots took 1.3 s per grid
        items = [(rs.image_uri((denormalize(transform(image), pre) * 255).round().astype("uint8"), fmt="PNG"),
                  " ".join(names[i] for i in clf.task.indices(label)) or "(no label)", False)
                 for (_, label), image in readable(chosen, lambda sample: sample[0])]
        body += f"<h3>{html.escape(what.capitalize())}</h3>" + rs.gallery(items)
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
