"""The options of ``visiontune report`` and ``visiontune data check``, each defined once.

Light on purpose (no torch): the CLI builds its flags from these dataclasses, and
:func:`~visiontune.evaluation.report.write_report` and
:func:`~visiontune.evaluation.data_check.check_data` take the same names as keywords.

Example:
    >>> DataCheckOptions.from_dict({"min_size": 64}).min_size
    64
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.options import CommandOptions, option
from ..training.registry import TASKS

_positive = (lambda v: v >= 1, "must be >= 1")
_workers = (lambda v: v is None or v >= 0, "must be >= 0")


@dataclass
class ReportOptions(CommandOptions):
    """Every option of ``visiontune report`` and :func:`~visiontune.evaluation.report.write_report`."""

    data: str | None = option(None, "evaluate on this labelled folder/CSV instead of the run's validation split",
                              metavar="DIR|CSV")
    gradcam: bool = option(True, "draw the Grad-CAM overlays")
    batch_size: int = option(32, "images per batch (32)", check=_positive)
    workers: int | None = option(None, "decoding processes (default: one per core)", check=_workers)
    seed: int = option(0, "seed of the sampled galleries and overlays (0)")
    unknown: str | None = option(None, "images of no class the model knows (a folder or glob): a section on its "
                                       "unknown-score, with the most confidently accepted of them and the most "
                                       "doubted known images", metavar="DIR")


@dataclass
class DataCheckOptions(CommandOptions):
    """Every option of ``visiontune data check`` and :func:`~visiontune.evaluation.data_check.check_data`."""

    val: str | None = option(None, "separate validation folder/CSV (leakage check)", metavar="DIR|CSV")
    task: str = option("auto", "single- or multi-label", choices=TASKS)
    label_delim: str = option(" ", "separator of the labels in one cell of a path,labels CSV (a space)",
                              metavar="SEP")
    min_size: int = option(32, "flag images smaller than this (32)", metavar="PX", check=(lambda v: v >= 0,
                                                                                          "must be >= 0"))
    min_per_class: int = option(10, "flag classes with fewer images (10)", check=(lambda v: v >= 0, "must be >= 0"))
    near_threshold: int = option(4, "near-duplicate: dHash Hamming distance at most this (4 of 64; -1 disables)",
                                 metavar="BITS", check=(lambda v: -1 <= v <= 64, "must be -1..64"))
    imbalance_warning: float = option(5.0, "warn when the largest class has this many times the images of the "
                                           "smallest (5)", metavar="X", check=(lambda v: v >= 1, "must be >= 1"))
    label_check: bool = option(True, "search for likely label errors (backbone features, cross-validated)")
    model: str = option("efficientnet_lite0", "backbone for the label check", metavar="NAME")
    img_size: int | None = option(None, "backbone input size (its default)",
                                  check=(lambda v: v is None or v >= 16, "must be >= 16"))
    cache_dir: str | None = option(None, "feature cache folder", metavar="PATH")
    folds: int = option(5, "cross-validation folds of the label check (5)", check=(lambda v: v >= 2, "must be >= 2"))
    seed: int = option(0, "cross-validation seed (0)")
    batch_size: int = option(32, "images per batch of the backbone (32)", check=_positive)
    workers: int | None = option(None, "decoding processes", check=_workers)
