"""The end of a ``--logger mlflow`` run: its epoch table, final metrics, artifacts and pyfunc model.

Lightning's ``MLFlowLogger`` streams what the Lightning loop logs while training (step losses,
per-epoch validation metrics, indexed by optimizer step). At the end, the run's own records go to
the same MLflow run, the same for every strategy (a linear probe never runs Lightning's loop):

- ``epoch/<column>`` at step = epoch: every row of ``RUN/metrics.csv``;
- ``val/<metric>`` and ``test/<metric>``: the best model's final evaluation;
- artifacts: ``card/`` (the ``README.md`` model card, ``model.json``), ``run/`` (curves, confusion
  matrix, report, metrics.csv, timings, plan, config) and the pyfunc model ``model``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from ..evaluation.evaluate import HEADLINE_METRICS
from ..evaluation.plots import plot_confusion_matrix
from ..models.readme import README_FILE
from ..training.context import TrainContext
from ..training.metrics import read_metrics


def log_run(ctx: TrainContext, metrics: dict[str, Any], val_result: dict[str, Any] | None) -> str:
    """Log the finished run to its MLflow run; returns the ``runs:/<id>/model`` URI of the pyfunc."""
    import mlflow  # lazy: only --logger mlflow needs it
    from mlflow.entities import Metric

    from .mlflow_model import log_pyfunc

    logger = ctx.logger
    client, run_id = logger.experiment, logger.run_id
    now = int(time.time() * 1000)
    records = [Metric(f"epoch/{key}", float(value), now, int(row["epoch"]))
               for row in (read_metrics(ctx.layout.metrics_csv) if ctx.layout.metrics_csv.is_file() else [])
               for key, value in row.items() if key != "epoch" and _number(value)]
    records += [Metric(f"{split}/{key}", float(values[key]), now, 0) for split, values in metrics.items()
                if split in ("val", "test") and isinstance(values, dict)
                for key in HEADLINE_METRICS if _number(values.get(key))]
    for start in range(0, len(records), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=records[start:start + 1000])
    layout = ctx.layout
    for path in (ctx.model_dir / README_FILE, ctx.model_dir / "model.json"):
        if path.is_file():
            client.log_artifact(run_id, str(path), "card")
    for path in (layout.curves, layout.report, layout.metrics_csv, layout.timings, layout.plan, layout.config):
        if path.is_file():
            client.log_artifact(run_id, str(path), "run")
    if val_result and val_result.get("confusion_matrix"):
        with tempfile.TemporaryDirectory() as tmp:
            image = plot_confusion_matrix(val_result["confusion_matrix"], list(val_result["class_names"]),
                                          Path(tmp) / "confusion_matrix.png")
            client.log_artifact(run_id, str(image), "run")
    with mlflow.start_run(run_id=run_id):
        info = log_pyfunc(ctx.model_dir)
    return info.model_uri


def _number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return value != ""
