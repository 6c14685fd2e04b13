"""The model card: ``model.json``, typed and validated.

Everything needed to use the weights travels in it: architecture, class names, preprocessing,
metrics, training summary, calibration, and (for pruned or exported models) their sections.
A card read from disk is untrusted until :meth:`ModelCard.from_dict` has checked every field
against sane bounds, so nothing is allocated from an absurd value.

Example:
    >>> card = ModelCard.from_dict({"format": "visiontune-model", "class_names": ["ant", "bee"],
    ...     "architecture": {"source": "timm", "name": "resnet18", "num_classes": 2, "classifier": "fc"},
    ...     "preprocessing": {"input_size": [3, 64, 64], "mean": [0.5] * 3, "std": [0.5] * 3}})
    >>> card.num_classes, card.preprocessing.height, card.temperature
    (2, 64, 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core.errors import ArtifactError
from ..data.labels import check_class_names
from ..data.preprocess import Preprocessing
from ..task import TASKS, Task, get_task
from ..task.multi import DEFAULT_THRESHOLD
from .factory import Architecture
from .tta import TTA_MODES as TTA_REGISTRY
from .unknown import check_section

FORMAT = "visiontune-model"
FORMAT_VERSION = 1
TEMPERATURE_RANGE = (0.01, 100.0)
# keys a card may carry; written in this order
KEYS = ("format", "format_version", "created", "architecture", "class_names", "preprocessing", "inference",
        "metrics", "training", "calibration", "unknown", "pruned", "export", "versions")
# inference.tta: the views every prediction averages (visiontune.models.tta; absent: one view)
TTA_MODES = tuple(name for name in TTA_REGISTRY if name != "none")


@dataclass
class ModelCard:
    """``model.json`` as an object; unknown keys are refused, known ones validated."""

    class_names: list[str]
    preprocessing: Preprocessing
    architecture: Architecture | None = None  # None only for exported graphs of unknown origin
    # how every prediction is made: {"tta": "flip-zoom", "task": "multi", "thresholds": [one per class]}
    inference: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    # the unknown-score: {"score": kind, "threshold", "tpr", ...} (visiontune.models.unknown)
    unknown: dict[str, Any] | None = None
    pruned: dict[str, Any] | None = None
    export: dict[str, Any] | None = None
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    model_dir: Path | None = None  # where it was loaded from (never written)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def temperature(self) -> float:
        """Calibration temperature (1.0 when the model was never calibrated)."""
        return float((self.calibration or {}).get("temperature", 1.0))

    @property
    def task(self) -> Task:
        """What the model answers (:mod:`visiontune.task`): single-label unless ``inference.task`` says otherwise."""
        return get_task(self.inference.get("task", "single"))

    @property
    def thresholds(self) -> list[float]:
        """Per-label decision thresholds of a multi-label model (tuned on val, else 0.5 each)."""
        return [float(t) for t in self.inference.get("thresholds") or [DEFAULT_THRESHOLD] * self.num_classes]

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    @property
    def unknown_threshold(self) -> float | None:
        """The unknown-score below which an image is ``unknown`` (None: the model has no score)."""
        return float(self.unknown["threshold"]) if self.unknown else None

    @property
    def tta(self) -> str:
        """The views every prediction averages: a mode of :mod:`visiontune.models.tta`, ``""`` for one."""
        return self.inference.get("tta") or ""

    def replace(self, **changes: Any) -> ModelCard:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to ``model.json``."""
        out: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "created": self.created,
                               "architecture": self.architecture.to_dict() if self.architecture else None,
                               "class_names": list(self.class_names), "preprocessing": self.preprocessing.to_dict(),
                               "inference": self.inference or None,
                               "metrics": self.metrics, "training": self.training, "calibration": self.calibration,
                               "unknown": self.unknown, "pruned": self.pruned, "export": self.export,
                               "versions": self.versions}
        return {k: out[k] for k in KEYS if out[k] is not None and (out[k] != "" or k != "created")}

    @classmethod
    def from_dict(cls, values: Any, source: str = "model.json", require_architecture: bool = True) -> ModelCard:
        """Validate ``values`` (a parsed model.json); :class:`ArtifactError` names the bad field."""
        if not isinstance(values, dict):
            raise ArtifactError(f"{source} must hold a JSON object")
        if values.get("format") != FORMAT:
            raise ArtifactError(f"{source} is not a visiontune model description")
        unknown = sorted(set(values) - set(KEYS) - {"model_dir"})
        if unknown:
            raise ArtifactError(f"{source} has unknown key(s) {unknown}")
        for key in (("architecture",) if require_architecture else ()) + ("class_names", "preprocessing"):
            if values.get(key) is None:
                raise ArtifactError(f"{source} lacks {key!r}")
        try:
            # an empty architecture ([], {}, "") is no architecture only where none is required (an
            # exported graph's); else it was accepted as None here and the card it gave did not load again
            given = values.get("architecture")
            arch = Architecture.from_dict(given) if given is not None and (given or require_architecture) else None
            # the rules data discovery applies to the same names, so a model trained here always loads
            names = check_class_names(values["class_names"], error=ArtifactError)
            pre = Preprocessing.from_dict(values["preprocessing"])
        except ArtifactError as exc:
            raise ArtifactError(f"{source}: {exc}") from None
        except ValueError as exc:
            raise ArtifactError(f"{source}: {exc}") from None
        if arch is not None and arch.num_classes != len(names):
            raise ArtifactError(f"{source}: architecture.num_classes is {arch.num_classes} but class_names "
                                f"lists {len(names)}")
        sections = {k: values.get(k) for k in ("metrics", "training", "versions", "inference")}
        for key, value in {**sections, **{k: values.get(k) for k in ("calibration", "pruned", "export")}}.items():
            if value is not None and not isinstance(value, dict):
                raise ArtifactError(f"{source}: {key} must be a JSON object")
        calibration = values.get("calibration")
        if calibration is not None:
            t = calibration.get("temperature")
            lo, hi = TEMPERATURE_RANGE
            # the range first: it also refuses nan and inf, and math.isfinite overflows on a huge integer
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not lo <= t <= hi:
                raise ArtifactError(f"{source}: calibration.temperature must be a number in [{lo}, {hi}], got {t!r}")
        inference = _check_inference(sections["inference"] or {}, len(names), source)
        unknown = check_section(values["unknown"], source) if values.get("unknown") is not None else None
        created = values.get("created", "")
        return cls(names, pre, arch, inference, sections["metrics"] or {}, sections["training"] or {}, calibration,
                   unknown, values.get("pruned"), values.get("export"), created if isinstance(created, str) else "",
                   sections["versions"] or {})


def _check_inference(inference: dict[str, Any], num_classes: int, source: str) -> dict[str, Any]:
    """The ``inference`` section: optional ``tta`` mode, ``task`` and per-label ``thresholds``."""
    unknown = sorted(set(inference) - {"tta", "task", "thresholds"})
    if unknown:
        raise ArtifactError(f"{source}: inference has unknown key(s) {unknown}; it takes tta, task, thresholds")
    if inference.get("tta") not in (None, *TTA_MODES):
        raise ArtifactError(f"{source}: inference.tta must be one of {list(TTA_MODES)}, got {inference['tta']!r}")
    name = inference.get("task", "single")
    if not isinstance(name, str) or name not in TASKS:
        raise ArtifactError(f"{source}: inference.task must be one of {list(TASKS)}, got {name!r}")
    problem = TASKS[name].check_thresholds(inference.get("thresholds"), num_classes)
    if problem:
        raise ArtifactError(f"{source}: {problem}")
    return dict(inference)
