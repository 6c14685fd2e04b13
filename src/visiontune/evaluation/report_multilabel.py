"""The report sections of a multi-label model: metrics, per-label AP table and PR curves, most
confused and co-missed label pairs, false positive / false negative galleries per label,
Grad-CAM for each predicted label, and calibration over every label decision.

Example:
    >>> target = torch.tensor([[1, 1, 0], [1, 0, 0]])
    >>> called = torch.tensor([[1, 0, 1], [0, 0, 1]])
    >>> label_pairs(target, called, ["a", "b", "c"])
    ([('a', 'c', 1), ('b', 'c', 1)], [])
"""

from __future__ import annotations

import random
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

from ..data.image import readable
from . import report_sections as rs
from .calibration import expected_calibration_error, label_decisions, reliability_diagram
from .gradcam import gradcam_overlays
from .multilabel_metrics import decisions, multilabel_metrics

GALLERY_PER_LABEL = 4  # false positives and false negatives shown per label
GALLERY_LABELS = 12  # labels with galleries (the lowest-AP ones first)
GRADCAM_IMAGES = 6
TOP_PAIRS = 10
PR_CURVES = 20  # labels drawn in the precision-recall plot (the lowest-AP ones first)


def multilabel_sections(inputs: rs.ReportInputs) -> list[tuple[str, str]]:
    """``(section id, html)`` pairs for :func:`~visiontune.evaluation.report.write_report`."""
    clf, logits, target, paths = inputs.clf, inputs.logits, inputs.target, inputs.paths
    if not len(target):
        return [("metrics", '<p class="warn">no readable labelled images to evaluate</p>')]
    names, thresholds = clf.class_names, clf.card.thresholds
    probs = clf.task.probabilities(logits.double(), inputs.temperature).float()
    result = multilabel_metrics(probs, target, names, thresholds)
    called = decisions(probs, thresholds)
    sections = [("metrics", _metrics(clf, result, inputs.source)),
                ("per-label", _per_label(result, probs, target, names)),
                ("label-pairs", _pairs(target.int(), called, names)),
                ("label-errors", _galleries(paths, probs, target.int(), called, result, names))]
    if inputs.gradcam:
        sections.append(("gradcam", _gradcam(clf, paths, called, probs, target.int(), names, inputs.seed)))
    sections.append(("calibration", _calibration(inputs)))
    return sections


def _metrics(clf, result: dict[str, Any], source: str) -> str:
    rows = [[f"best epoch: {k}" if not isinstance(v, dict) else k, v] for k, v in clf.card.metrics.items()
            if isinstance(v, (int, float))]
    for split, values in clf.card.metrics.items():
        if isinstance(values, dict):
            rows += [[f"{split} {k}", v] for k, v in values.items()]
    for key in ("macro_map", "micro_map", "macro_f1", "micro_f1", "example_f1", "subset_accuracy", "hamming_loss"):
        rows.append([f"this report ({source}): {key}", result[key]])
    card = result["label_cardinality"]
    rows.append([f"this report ({source}): labels per image, predicted / true",
                 f"{card['predicted']:.2f} / {card['true']:.2f}"])
    return ("<p>Each label is decided on its own: probability sigmoid(logit / T) at or above the label's "
            "threshold (tuned for max F1 on the validation split, stored in model.json).</p>"
            + rs.table(["metric", "value"], rows))


def _per_label(result: dict[str, Any], probs: torch.Tensor, target: torch.Tensor, names: list[str]) -> str:
    from torchmetrics.functional.classification import multilabel_precision_recall_curve  # lazy: report only

    per = result["per_label"]
    rows = [[n, "" if m["ap"] is None else m["ap"], m["threshold"], m["precision"], m["recall"], m["f1"],
             m["support"]] for n, m in per.items()]
    body = rs.table(["label", "AP", "threshold", "precision", "recall", "F1", "support"], rows)
    precision, recall, _ = multilabel_precision_recall_curve(probs, target.int(), num_labels=len(names))
    worst = sorted((n for n in names if per[n]["ap"] is not None), key=lambda n: per[n]["ap"])[:PR_CURVES]
    fig, ax = rs.plt.subplots(figsize=(6.5, 5))
    for name in worst:
        i = names.index(name)
        ax.plot(recall[i].numpy(), precision[i].numpy(), lw=1.2, label=f"{name} (AP {per[name]['ap']:.2f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    what = "Precision-recall curves" + (f" of the {len(worst)} lowest-AP labels" if len(worst) < len(names) else "")
    return body + f"<h3>{what}</h3>" + rs.img_tag(rs.fig_uri(fig), "precision-recall curves")


def label_pairs(target: torch.Tensor, called: torch.Tensor, names: list[str]
                ) -> tuple[list[tuple[str, str, int]], list[tuple[str, str, int]]]:
    """(confused: a true label missed while another, absent one was called, by count;
    co-missed: two true labels missed together in one image, by count)."""
    confused: dict[tuple[str, str], int] = {}
    co_missed: dict[tuple[str, str], int] = {}
    for truth, call in zip(target.tolist(), called.tolist()):
        missed = [names[i] for i, (t, c) in enumerate(zip(truth, call)) if t and not c]
        extra = [names[i] for i, (t, c) in enumerate(zip(truth, call)) if c and not t]
        for pair in ((a, b) for a in missed for b in extra):
            confused[pair] = confused.get(pair, 0) + 1
        for pair in combinations(sorted(missed), 2):
            co_missed[pair] = co_missed.get(pair, 0) + 1

    def ranked(counts):
        return [(a, b, n) for (a, b), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]

    return ranked(confused), ranked(co_missed)


def _pairs(target: torch.Tensor, called: torch.Tensor, names: list[str]) -> str:
    confused, co_missed = label_pairs(target, called, names)
    return ("<h3>Missed a label, called another instead (same image)</h3>"
            + (rs.table(["true label missed", "absent label called", "images"], confused[:TOP_PAIRS], left=2)
               if confused else '<p class="muted">none</p>')
            + "<h3>Two true labels missed together</h3>"
            + (rs.table(["label", "label", "images"], co_missed[:TOP_PAIRS], left=2)
               if co_missed else '<p class="muted">none</p>'))


def _caption(path: str, name: str, p: float, truth: list[str]) -> str:
    return f"{Path(path).name}: p({name}) {p:.2f}, true [{' '.join(truth) or 'none'}]"


def _galleries(paths: list[str], probs: torch.Tensor, target: torch.Tensor, called: torch.Tensor,
               result: dict[str, Any], names: list[str]) -> str:
    per = result["per_label"]
    order = sorted(names, key=lambda n: (per[n]["ap"] if per[n]["ap"] is not None else 2.0, n))[:GALLERY_LABELS]
    truths = [[names[j] for j in torch.nonzero(row).flatten().tolist()] for row in target]
    body = (f"<p>For the {len(order)} labels with the lowest AP: the most confident false positives and the "
            "least confident false negatives at the label's threshold.</p>")
    for name in order:
        i = names.index(name)
        fp = [k for k in torch.argsort(probs[:, i], descending=True).tolist() if called[k, i] and not target[k, i]]
        fn = [k for k in torch.argsort(probs[:, i]).tolist() if target[k, i] and not called[k, i]]
        items = []
        for kind, picks in (("FP", fp), ("FN", fn)):
            for k in picks[:GALLERY_PER_LABEL]:
                uri = rs.thumb_uri(paths[k])
                if uri:
                    items.append((uri, f"{kind} " + _caption(paths[k], name, float(probs[k, i]), truths[k]), True))
        body += f"<h3>{name}: {len(fp)} false positive(s), {len(fn)} false negative(s)</h3>" + rs.gallery(items)
    return body


def _gradcam(clf, paths: list[str], called: torch.Tensor, probs: torch.Tensor, target: torch.Tensor,
             names: list[str], seed: int) -> str:
    with_labels = [k for k in range(len(paths)) if called[k].any()]
    chosen = random.Random(seed).sample(with_labels, min(GRADCAM_IMAGES, len(with_labels)))
    images, targets, captions = [], [], []
    for k, image in readable(chosen, lambda k: paths[k]):
        truth = [names[j] for j in torch.nonzero(target[k]).flatten().tolist()]
        for j in torch.nonzero(called[k]).flatten().tolist():  # one heatmap per predicted label
            images.append(image)
            targets.append(j)
            captions.append((_caption(paths[k], names[j], float(probs[k, j]), truth), not target[k, j]))
    if not images:
        return '<p class="muted">no image with a predicted label</p>'
    overlays = gradcam_overlays(clf, images, targets)
    items = [(rs.image_uri(ov, max_side=224, fmt="PNG"), cap, bad) for ov, (cap, bad) in zip(overlays, captions)]
    return ("<p>For each predicted label, the evidence for that label's logit over the input as the model sees "
            "it; a red caption is a label the image does not have.</p>" + rs.gallery(items))


def _calibration(inputs: rs.ReportInputs) -> str:
    z, y = label_decisions(inputs.logits, inputs.target)
    temperature = inputs.temperature
    raw, scaled = torch.softmax(z, 1), torch.softmax(z / temperature, 1)
    diagram = inputs.run_dir / ".reliability.png"
    reliability_diagram(raw, y, diagram, probs_after=scaled,
                        title=f"{inputs.source}, every label decision, T = {temperature:.3f}")
    uri = rs.file_uri(diagram)
    diagram.unlink(missing_ok=True)
    eval_ece = (expected_calibration_error(raw, y), expected_calibration_error(scaled, y))
    return ("<p>Every (image, label) decision counts once: its confidence is max(p, 1 - p) of the label's "
            "probability, right when it matches the truth at p = 0.5.</p>"
            + rs.calibration_section(inputs.calibration, uri, eval_ece))
