"""Calibration: temperature scaling fitted on the validation split, ECE and reliability diagrams.

A network's softmax "probability" is usually over-confident. Temperature scaling divides the
logits by one scalar T > 0 fitted on held-out data (minimum NLL); it never changes the argmax,
so accuracy is untouched, only the probabilities become honest. The fitted T is stored in
``model.json`` under ``"calibration"`` and :class:`~visiontune.inference.classifier.Classifier`
applies ``softmax(logits / T)``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.safe_io import save_figure
from ..models.artifact import read_card, resolve_model_dir, write_card

ECE_BINS = 15
# Sharpening (T < 1) is fitted to how few and how timid the mistakes are: with none, the fit runs
# to T = 0.05 (a 49-image val set answered 100% right gave p = 1.000000 on later mistakes); with
# a few near-ties it does too (cross-validated probes on 196 images: T = 0.05, then held-out
# mistakes at p = 1.0). So T < 1 only while every observed mistake stays at p <= this cap.
MAX_WRONG_CONFIDENCE = 0.99
# A log-normal prior on T (log T ~ N(0, 0.5^2)): worth about one nat at T = 0.5 or 2. Thousands of
# images outweigh it; a few hundred confidently right ones, whose NLL barely moves, do not.
PRIOR_SIGMA = 0.5
BOOTSTRAP_RESAMPLES = 100
T_RANGE = (0.05, 100.0)


def fit_temperature(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, max_iter: int = 200,
                    prior_sigma: float | None = PRIOR_SIGMA) -> float:
    """The temperature T minimising the NLL of ``softmax(logits / T)`` on ``labels`` (LBFGS on log T),
    plus a log-normal prior on T around 1 (``prior_sigma``; None: plain maximum likelihood).

    Example:
        >>> z = torch.tensor([[4.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 0.0]])
        >>> round(fit_temperature(z, torch.tensor([0, 1, 1, 0])), 1) > 1.0
        True
    """
    z = torch.as_tensor(logits, dtype=torch.float64).detach()
    y = torch.as_tensor(labels, dtype=torch.long)
    if len(y) == 0:
        return 1.0
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)  # T = exp(log_t) stays positive
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    prior = 0.0 if prior_sigma is None else 1.0 / (2 * prior_sigma**2 * len(y))  # per image, as the mean NLL

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y) + prior * log_t.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not np.isfinite(t):
        return 1.0
    return float(min(max(t, T_RANGE[0]), T_RANGE[1]))


def bootstrap_temperatures(logits: torch.Tensor, labels: torch.Tensor, resamples: int = BOOTSTRAP_RESAMPLES,
                           seed: int = 0, group: int = 1) -> tuple[float, float]:
    """The 5% and 95% quantiles of the fitted T over bootstrap resamples of the images.

    Every resample's NLL is evaluated on one grid of T at once (a weighted sum of per-image
    losses), so a hundred refits cost about one pass over the logits per grid point. ``group``
    consecutive rows are one image (a multi-label image's label decisions): images are resampled.
    """
    z = logits.double()
    grid = torch.logspace(math.log10(T_RANGE[0]), math.log10(T_RANGE[1]), 241, dtype=torch.float64)
    images = len(labels) // group
    losses = torch.stack([torch.nn.functional.cross_entropy(z / t, labels, reduction="none").view(images, group)
                          .sum(1) for t in grid])
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(images, (resamples, images), generator=gen)
    weights = torch.zeros(resamples, images, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(resamples, images, dtype=torch.float64))
    penalty = grid.log().pow(2) / (2 * PRIOR_SIGMA**2)  # the same prior as fit_temperature
    best = grid[(weights @ losses.T + penalty).argmin(1)]
    return float(torch.quantile(best, 0.05)), float(torch.quantile(best, 0.95))


def _confidences(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(torch.as_tensor(probs, dtype=torch.float64))
    y = np.asarray(torch.as_tensor(labels)).astype(int)
    return p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)


def calibration_bins(probs, labels, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Equal-width confidence bins: ``count``, mean ``confidence`` and ``accuracy`` per bin."""
    conf, correct = _confidences(probs, labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    out = []
    for b in range(bins):
        mask = index == b
        n = int(mask.sum())
        out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n,
                    "confidence": float(conf[mask].mean()) if n else float("nan"),
                    "accuracy": float(correct[mask].mean()) if n else float("nan")})
    return out


def expected_calibration_error(probs, labels, bins: int = ECE_BINS) -> float:
    """ECE: sum over confidence bins of |accuracy - confidence| weighted by the bin's share."""
    total = len(np.asarray(torch.as_tensor(labels)))
    if total == 0:
        return 0.0
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"])
                     for b in calibration_bins(probs, labels, bins) if b["count"]))


def reliability_diagram(probs, labels, out_png: str | os.PathLike, bins: int = ECE_BINS,
                        probs_after=None, title: str = "") -> Path:
    """Accuracy vs confidence per bin (the diagonal is perfect calibration); with ``probs_after``
    a second panel shows the temperature-scaled probabilities."""
    import matplotlib  # lazy: calibration runs inside every training; only the diagram needs matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("before", probs)] + ([("after temperature scaling", probs_after)] if probs_after is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, (name, p) in zip(axes[0], panels):
        stats = calibration_bins(p, labels, bins)
        width = 1.0 / bins
        centers = [b["lo"] + width / 2 for b in stats]
        acc = [b["accuracy"] if b["count"] else 0.0 for b in stats]
        ax.bar(centers, acc, width=width * 0.95, color="#4c72b0", edgecolor="#1f3b63", label="accuracy")
        gap = [(c, b["confidence"] - b["accuracy"]) for c, b in zip(centers, stats) if b["count"]]
        if gap:
            ax.bar([c for c, _ in gap], [g for _, g in gap], bottom=[b["accuracy"] for b in stats if b["count"]],
                   width=width * 0.95, color="#dd8452", alpha=0.55, label="gap")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: ECE {expected_calibration_error(p, labels, bins):.3f}")
        ax.legend(loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = save_figure(fig, out_png, dpi=100)
    plt.close(fig)
    return out




def sharpest_keeping_errors_doubtful(wrong_logits: torch.Tensor, cap: float = MAX_WRONG_CONFIDENCE) -> float:
    """The smallest T at which none of these (wrongly answered) images gets a top probability
    above ``cap``: a few errors show that a model is under-confident, not by how much.

    Example:
        >>> t = sharpest_keeping_errors_doubtful(torch.tensor([[2.0, 0.0]]))
        >>> round(float(torch.softmax(torch.tensor([2.0, 0.0]) / t, 0).max()), 4)
        0.99
    """
    def top(t: float) -> float:
        return float(torch.softmax(wrong_logits.double() / t, 1).max())

    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    if top(math.exp(lo)) <= cap:
        return T_RANGE[0]
    for _ in range(60):  # bisection on log T: the top probability falls as T grows
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if top(math.exp(mid)) <= cap else (mid, hi)
    return math.exp(hi)


def calibration_summary(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS,
                        source: str = "validation", group: int = 1) -> dict[str, Any]:
    """Fit T on ``logits``/``labels``; return the ``model.json`` calibration entry.

    With no wrong answer T is never below 1; otherwise it sharpens (T < 1) only as far as keeps
    every wrong answer at p <= :data:`MAX_WRONG_CONFIDENCE`. Its uncertainty is reported as the
    5-95% range of T over bootstrap resamples of the images.
    """
    logits, labels = logits.double(), torch.as_tensor(labels, dtype=torch.long)
    wrong = logits.argmax(1) != labels
    errors = int(wrong.sum())
    if errors == 0:
        floor = 1.0  # no mistake to learn from: never sharpen
    else:  # sharpen at most until the most confident observed mistake reaches the cap (never soften for it)
        floor = min(1.0, sharpest_keeping_errors_doubtful(logits[wrong]))
    t = max(fit_temperature(logits, labels), floor)
    low, high = ((max(v, floor) for v in bootstrap_temperatures(logits, labels, group=group)) if len(labels)
                 else (t, t))
    before = expected_calibration_error(torch.softmax(logits, 1), labels, bins)
    after = expected_calibration_error(torch.softmax(logits / t, 1), labels, bins)
    nll_before = float(torch.nn.functional.cross_entropy(logits, labels))
    nll_after = float(torch.nn.functional.cross_entropy(logits / t, labels))
    return {"temperature": round(t, 6), "temperature_range": [round(low, 4), round(high, 4)],
            "ece_before": round(before, 6), "ece_after": round(after, 6),
            "nll_before": round(nll_before, 6), "nll_after": round(nll_after, 6), "num_val": int(len(labels)),
            "errors": errors, "source": source, "bins": bins,
            "method": "temperature scaling (LBFGS on NLL; T >= 1 without errors; T < 1 only while no error "
                      f"exceeds p = {MAX_WRONG_CONFIDENCE}; 5-95% bootstrap range)"}


def label_decisions(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every label decision of multi-label ``logits``/``target`` ``[N, C]`` as a two-class problem:
    logits ``[0, z]`` (``softmax([0, z] / T)[1] = sigmoid(z / T)``) and labels, ``[N*C, 2]`` and ``[N*C]``.
    The temperature fit, its prior and error cap, ECE and the reliability diagram then apply
    unchanged, over all label decisions."""
    z = logits.double().reshape(-1, 1)
    return torch.cat([torch.zeros_like(z), z], 1), target.reshape(-1).long()


def multilabel_calibration(logits: torch.Tensor, target: torch.Tensor, source: str = "validation") -> dict[str, Any]:
    """The ``model.json`` calibration entry of a multi-label model: one temperature for every
    label's sigmoid, fitted on all label decisions of the images (``source``: which ones)."""
    entry = calibration_summary(*label_decisions(logits, target), source=f"{source} (every label decision)",
                                group=max(1, target.shape[1]))
    return {**entry, "num_val": int(len(target)), "decisions": int(target.numel())}


def calibration_note(entry: dict[str, Any]) -> str:
    """How the training log states a fitted single-label calibration entry."""
    where = "out-of-fold" if str(entry.get("source", "")).startswith("out-of-fold") else "val"
    return (f"temperature {entry['temperature']:.3f}, {where} ECE {entry['ece_before']:.3f} -> "
            f"{entry['ece_after']:.3f}")


def label_calibration_note(entry: dict[str, Any]) -> str:
    """How the training log states a fitted multi-label calibration entry (over every label decision)."""
    return (f"temperature {entry['temperature']:.3f} over {entry['decisions']} val label decisions, ECE "
            f"{entry['ece_before']:.3f} -> {entry['ece_after']:.3f}")


def store_calibration(model_dir: str | os.PathLike, entry: dict[str, Any]) -> dict[str, Any]:
    """Write ``entry`` as ``"calibration"`` into ``model.json`` (atomically; weights untouched)."""
    directory = resolve_model_dir(model_dir)
    write_card(directory, read_card(directory).replace(calibration=entry))
    return entry
