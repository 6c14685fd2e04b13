"""How well a model's unknown-score tells its classes from images of none: ``evaluate --unknown DIR``.

Known images are the labelled data ``evaluate`` scores; unknown images are any images of no class
the model knows. Measured: the AUROC (the chance a known image scores above an unknown one), the
share of unknown images accepted when 95% of the known ones are (FPR at 95% TPR), what the stored
threshold does on this data (known images accepted, unknown images rejected), and the
accuracy/coverage curve with the unknowns counted: at each threshold, the share of all images
answered and the share of answers that are right, an accepted unknown image being a wrong answer.

Example:
    result = evaluate("runs/train-1", "data/test", unknown="photos/other")
    result["unknown"]["auroc"], result["unknown"]["fpr_at_95_tpr"]
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.errors import ConfigError
from ..training.unknown import auroc, fpr_at_tpr

CURVE_TPRS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)  # known shares accepted along the curve


def unknown_metrics(known: np.ndarray, correct: np.ndarray | None, unknown: np.ndarray, threshold: float
                    ) -> dict[str, Any]:
    """Metrics of unknown-scores: ``known`` (and whether each known image's answer is ``correct``;
    None for a multi-label model) against ``unknown``, with the model's ``threshold``."""
    known, unknown = np.asarray(known, np.float64), np.asarray(unknown, np.float64)
    if len(known) == 0 or len(unknown) == 0:
        raise ConfigError("measuring the unknown-score needs readable known and unknown images")
    out: dict[str, Any] = {
        "auroc": round(auroc(known, unknown), 4),
        "fpr_at_95_tpr": round(fpr_at_tpr(known, unknown, 0.95), 4),
        "threshold": threshold,
        "known_accepted": round(float((known >= threshold).mean()), 4),
        "unknown_rejected": round(float((unknown < threshold).mean()), 4),
        "num_known": int(len(known)), "num_unknown": int(len(unknown)),
    }
    if correct is not None:
        curve = []
        ranked = np.sort(known)[::-1]
        for tpr in CURVE_TPRS:
            t = ranked[min(len(ranked), max(1, int(np.ceil(tpr * len(ranked))))) - 1]
            accepted_known, accepted_unknown = known >= t, unknown >= t
            answered = int(accepted_known.sum() + accepted_unknown.sum())
            curve.append({"known_accepted": tpr, "coverage": round(answered / (len(known) + len(unknown)), 4),
                          "accuracy": round(float(correct[accepted_known].sum() / answered), 4) if answered else None})
        out["accuracy_coverage"] = curve
        accepted = int((known >= threshold).sum() + (unknown >= threshold).sum())
        right = float(correct[known >= threshold].sum())
        out["accuracy_at_threshold"] = round(right / accepted, 4) if accepted else None
    return out


def format_unknown(result: dict[str, Any]) -> str:
    """``evaluate --unknown``'s lines."""
    u = result
    lines = [f"unknown images: {u['num_unknown']}   AUROC {u['auroc']:.4f}   FPR at 95% TPR {u['fpr_at_95_tpr']:.4f}",
             f"at the model's threshold {u['threshold']:.4g}: {u['known_accepted']:.1%} of known images accepted, "
             f"{u['unknown_rejected']:.1%} of unknown images rejected"
             + (f", accuracy of the answers {u['accuracy_at_threshold']:.4f}"
                if u.get("accuracy_at_threshold") is not None else "")]
    if u.get("accuracy_coverage"):
        lines.append("known accepted  coverage  accuracy (unknowns answered count as wrong)")
        lines += [f"{row['known_accepted']:>14.0%}  {row['coverage']:>8.3f}  {row['accuracy']:>8.4f}"
                  for row in u["accuracy_coverage"] if row["accuracy"] is not None]
    return "\n".join(lines)
