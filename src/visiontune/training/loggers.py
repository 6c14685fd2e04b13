"""Training loggers (``--logger csv|tensorboard|mlflow``), built once per run.

CSV and TensorBoard write under ``RUN/logs``. MLflow uses Lightning's ``MLFlowLogger`` against
``MLFLOW_TRACKING_URI`` or, unset, MLflow's own default store (``sqlite:///mlflow.db`` in the
working directory, artifacts under ``./mlruns``: what ``mlflow ui`` run there shows). The MLflow
run is created before training, with the resolved config as its params, and its id is kept in
``RUN/logs/mlflow.json`` so that ``--resume`` continues the same MLflow run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..core.hardware import is_rank_zero
from ..core.safe_io import atomic_write_text

MLFLOW_RUN_FILE = "mlflow.json"  # under RUN/logs: the tracking URI and run id (for --resume)
DEFAULT_EXPERIMENT = "visiontune"


def csv_logger(run_dir: Path, logs: Path, run_name: str, params: dict[str, Any]):
    from lightning.pytorch.loggers import CSVLogger  # lazy: the CLI parser never imports Lightning

    return CSVLogger(run_dir, name=logs.name, version="")


def tensorboard_logger(run_dir: Path, logs: Path, run_name: str, params: dict[str, Any]):
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(run_dir, name=logs.name, version="")


def mlflow_logger(run_dir: Path, logs: Path, run_name: str, params: dict[str, Any]):
    """Lightning's ``MLFlowLogger`` on the MLflow run of this run dir (created, or continued on resume).

    The experiment is ``MLFLOW_EXPERIMENT_NAME`` or ``visiontune``; the MLflow run is named after
    the run dir. Fails before training, naming the remedy, when MLflow is missing or its store
    cannot be reached.
    """
    try:
        import mlflow
        from lightning.pytorch.loggers import MLFlowLogger
    except ImportError:
        raise ConfigError("--logger mlflow needs MLflow: pip install 'visiontune[mlflow]'") from None
    uri = mlflow.get_tracking_uri()  # MLFLOW_TRACKING_URI, else MLflow's default local store
    previous = _previous_run(logs / MLFLOW_RUN_FILE, uri)
    try:
        logger = MLFlowLogger(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT,
                              run_name=run_name, tracking_uri=uri, run_id=previous, log_model=False)
        if is_rank_zero():  # other DDP ranks never touch the store (Lightning logs from rank 0 only)
            run_id = logger.run_id  # creates the run now: a bad URI fails here, before any training
            if previous is None:
                logger.log_hyperparams(params)
            logs.mkdir(parents=True, exist_ok=True)
            atomic_write_text(logs / MLFLOW_RUN_FILE, json.dumps({"tracking_uri": uri, "run_id": run_id}) + "\n")
    except ConfigError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ConfigError(f"MLflow tracking at {uri} failed ({first}); set MLFLOW_TRACKING_URI to a reachable "
                          "tracking server or database, e.g. sqlite:///mlflow.db") from None
    return logger


def _previous_run(path: Path, uri: str) -> str | None:
    """The MLflow run id a resumed run dir recorded, if it was tracked at the same URI."""
    try:  # RUN/logs is not trusted: a small JSON object or nothing
        data = json.loads(path.read_text()) if path.is_file() and path.stat().st_size < 4096 else None
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    run_id = data.get("run_id")
    if data.get("tracking_uri") != uri or not isinstance(run_id, str) or not run_id.isalnum():
        return None  # another store: start a new MLflow run there
    return run_id

