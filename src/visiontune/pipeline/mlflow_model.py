"""A visiontune model as an MLflow pyfunc: image bytes or paths in, ``visiontune predict``'s columns out.

The model is logged with MLflow's *models from code* (a three-line script that imports
:class:`VisiontuneModel`), so loading it unpickles nothing; the model folder itself
(``model.safetensors`` + ``model.json``) travels as the artifact ``model``.

Input: a DataFrame with an ``image`` column (encoded image bytes; base64 in ``mlflow models
serve`` JSON) and/or a ``path`` column (image files where the model runs; per row the image wins
when both are given). Paths are read only when the model is loaded with
``model_config={"allow_paths": True}``: ``mlflow models serve`` hands the DataFrame of any client
to ``predict``, and a client must not make the server open files of its choosing.

Output: one row per input with the columns of the predictions CSV
(``path``, ``label``, ``probability``, ``top1_label``, ... ``error``; a multi-label model's
``labels`` and ``p_<class>``), probabilities as floats. ``params={"top_k": k}`` sets k.

Example:
    model = mlflow.pyfunc.load_model("runs:/<run id>/model")
    model.predict(pd.DataFrame({"image": [open("ant.jpg", "rb").read()]}))
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from ..inference.classifier import Classifier
from ..inference.rows import csv_cells, csv_header
from ..task import Task

ARTIFACT = "model"  # the visiontune model folder inside the MLflow model
DEFAULT_TOP_K = 5
PATHS_OFF = "paths are not read by this model; send the image bytes, or load it with model_config={'allow_paths': True}"
_CODE = "from mlflow.models import set_model\n\nfrom visiontune.pipeline.mlflow_model import VisiontuneModel\n\n" \
        "set_model(VisiontuneModel())\n"


class VisiontuneModel(mlflow.pyfunc.PythonModel):
    """The pyfunc: loads the model folder once, predicts with :meth:`Classifier.predict`."""

    # the logged signature describes the input; MLflow's type-hint validation (and its warning that
    # predict() has no hints) does not apply to a DataFrame of bytes or paths
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        self.clf = Classifier.load(context.artifacts[ARTIFACT])
        self.allow_paths = bool((context.model_config or {}).get("allow_paths", False))

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        top_k = (params or {}).get("top_k", DEFAULT_TOP_K)
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ValueError(f"params top_k must be a whole number >= 1, got {top_k!r}")
        inputs = _inputs(model_input)
        refused = set() if self.allow_paths else {i for i, x in enumerate(inputs) if isinstance(x, str)}
        rows = self.clf.predict([b"" if i in refused else x for i, x in enumerate(inputs)], top_k=top_k)
        for i in refused:  # an error row like an unreadable image's, naming the remedy
            rows[i].update(path=inputs[i], error=PATHS_OFF)
        return prediction_frame(rows, min(top_k, len(self.clf.class_names)), self.clf.class_names, self.clf.task,
                                self.clf.unknown_threshold is not None)


def _inputs(model_input: Any) -> list[bytes | str]:
    """Rows of an ``image`` (bytes) and/or ``path`` (str) DataFrame, a list, or one value."""
    if isinstance(model_input, pd.DataFrame):
        images = model_input["image"] if "image" in model_input else [None] * len(model_input)
        paths = model_input["path"] if "path" in model_input else [None] * len(model_input)
        return [bytes(image) if isinstance(image, (bytes, bytearray, memoryview)) else str(path) if _given(path)
                else b""
                for image, path in zip(images, paths)]
    if isinstance(model_input, (bytes, str)):
        return [model_input]
    return [x if isinstance(x, bytes) else str(x) for x in model_input]


def _given(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and str(value) != ""


def prediction_frame(rows: list[dict[str, Any]], k: int, class_names: list[str], task: Task,
                     unknown: bool = False) -> pd.DataFrame:
    """The ``task``'s prediction rows as the predictions CSV's table, probabilities (and, for a model
    with an unknown-score, ``unknown`` and ``unknown_score``) as floats (NaN where empty)."""
    header = csv_header(k, class_names, task=task, unknown=unknown)
    numeric = {h for h in header if h in ("probability", "unknown_score") or h.endswith("_probability")
               or h.startswith("p_")}
    table = [dict(zip(header, csv_cells(row, k, class_names, task=task, unknown=unknown))) for row in rows]
    frame = pd.DataFrame(table, columns=header)
    for column in numeric:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def signature() -> ModelSignature:
    """Inputs ``image`` (binary) and ``path`` (string), both optional per column; param ``top_k``."""
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image", required=False), ColSpec("string", "path", required=False)]),
        params=ParamSchema([ParamSpec("top_k", "long", DEFAULT_TOP_K)]))


def log_pyfunc(model_dir: str | os.PathLike, name: str = "model") -> Any:
    """Log ``model_dir`` as an MLflow pyfunc under the active run; returns MLflow's ``ModelInfo``."""
    from importlib.metadata import version

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # MLflow suggests an input example; one would be an image in the store and a model load now
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        code = Path(tmp) / "visiontune_pyfunc.py"
        code.write_text(_CODE)
        return mlflow.pyfunc.log_model(name=name, python_model=str(code), artifacts={ARTIFACT: str(model_dir)},
                                       signature=signature(), model_config={"allow_paths": False},
                                       pip_requirements=[f"visiontune=={version('visiontune')}"])
