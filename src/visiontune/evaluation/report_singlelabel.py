"""The report sections of a single-label model: metrics, per-class table, confusion matrix,
most-confused pairs, misclassified and top-loss galleries, Grad-CAM, calibration and the
accuracy/coverage trade-off."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from ..data.image import readable
from ..inference.classifier import Classifier
from . import report_sections as rs
from .calibration import expected_calibration_error, reliability_diagram
from .gradcam import gradcam_overlays
from .singlelabel_metrics import compute_metrics

GALLERY_SIZE = 24
GRADCAM_PER_KIND = 6


def single_label_sections(inputs: rs.ReportInputs) -> list[tuple[str, str]]:
    """``(section id, html)`` pairs for :func:`~visiontune.evaluation.report.write_report`."""
    clf, logits, target, source = inputs.clf, inputs.logits, inputs.target, inputs.source
    if not len(target):
        return [("metrics", '<p class="warn">no readable labelled images to evaluate</p>')]
    names, temperature = clf.class_names, inputs.temperature
    raw_probs = clf.task.probabilities(logits.double(), 1.0)
    probs = clf.task.probabilities(logits.double(), temperature)
    result = compute_metrics(probs.float(), target, names)
    training = {k: v for k, v in clf.card.training.items() if not isinstance(v, (dict, list))}
    sections = [("metrics", rs.metrics_section(clf.card.metrics, result, source, training)),
                ("per-class", rs.per_class_section(result)),
                ("confusion", rs.confusion_section(result["confusion_matrix"], names)),
                ("confused-pairs", rs.confused_pairs_section(result["confusion_matrix"], names)),
                ("errors", _errors_section(inputs.paths, target, probs, names))]
    if inputs.gradcam:
        sections.append(("gradcam", _gradcam_section(clf, inputs.paths, target, probs, names, inputs.seed)))
    diagram = inputs.run_dir / ".reliability.png"
    reliability_diagram(raw_probs, target, diagram, probs_after=probs, title=f"{source}, T = {temperature:.3f}")
    uri = rs.file_uri(diagram)
    diagram.unlink(missing_ok=True)
    eval_ece = (expected_calibration_error(raw_probs, target), result["ece"])  # the metrics' own, calibrated
    sections.append(("calibration", rs.calibration_section(inputs.calibration, uri, eval_ece)))
    sections.append(("coverage", rs.coverage_section(probs.numpy(), target.numpy())))
    return sections


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
    loaded = list(readable(chosen, lambda i: paths[i]))
    kept, images = [i for i, _ in loaded], [image for _, image in loaded]
    if not images:
        return '<p class="muted">no images</p>'
    overlays = gradcam_overlays(clf, images)
    items = [(rs.image_uri(ov, max_side=224, fmt="PNG"),
              _caption(paths[i], int(target[i]), int(pred[i]), float(probs[i, pred[i]]), names),
              bool(pred[i] != target[i]))
             for i, ov in zip(kept, overlays)]
    return ("<p>Heatmap of the evidence for the predicted class over the input as the model sees it "
            "(resized and cropped). Correct predictions first, then errors (red captions).</p>" + rs.gallery(items))
