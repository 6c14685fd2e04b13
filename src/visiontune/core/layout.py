"""The run-dir layout, defined once: every module that reads or writes a run asks this class.

A run dir from ``visiontune train``::

    RUN/config.yaml            the resolved options (``--resume`` reads them back)
    RUN/model/                 the best model: model.safetensors + model.json
    RUN/checkpoints/           epochNNN.ckpt (the two newest), stepNNNNNNN.ckpt, interrupted.ckpt
    RUN/splits/{train,val,test}.csv   the exact split used (path,label)
    RUN/metrics.csv            one row per epoch
    RUN/curves.png, RUN/report.html, RUN/skipped_files.txt, RUN/logs/, RUN/compare.csv
    RUN/plan.json              what a --time budget chose, and the projected time of each phase
    RUN/timings.json           how long each phase of the command took

Example:
    >>> run = RunLayout("runs/train-1")
    >>> str(run.split_csv("val"))
    'runs/train-1/splits/val.csv'
    >>> RunLayout.of_model_dir("runs/train-1/model").root.name
    'train-1'
"""

from __future__ import annotations

import os
from pathlib import Path

SPLITS = ("train", "val", "test")
MODEL_DIR = "model"


class RunLayout:
    """Paths inside one run dir (nothing is created or checked by building one)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        names = ("config.yaml", MODEL_DIR, "checkpoints", "splits", "metrics.csv", "curves.png", "report.html",
                 "skipped_files.txt", "logs", "compare.csv", "plan.json", "timings.json")
        (self.config, self.model_dir, self.checkpoints, self.splits, self.metrics_csv, self.curves, self.report,
         self.skipped, self.logs, self.compare_csv, self.plan, self.timings) = (self.root / name for name in names)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunLayout) and other.root == self.root

    def __repr__(self) -> str:
        return f"RunLayout({str(self.root)!r})"

    @classmethod
    def of_model_dir(cls, model_dir: str | os.PathLike) -> RunLayout:
        """The run a ``RUN/model`` dir belongs to (its parent)."""
        return cls(Path(model_dir).parent)

    def split_csv(self, split: str) -> Path:
        return self.splits / f"{split}.csv"

    def is_run(self) -> bool:
        """True when this looks like a run dir (it has a config.yaml)."""
        return self.config.is_file()
