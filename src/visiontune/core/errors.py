"""One base class for every error visiontune raises on purpose.

Each error's message names what is wrong and the remedy; ``kind`` says what went wrong as an
attribute (never parsed from the text), and ``exit_code`` is what the CLI exits with. The CLI
catches :class:`VisiontuneError` alone: anything else is a bug and keeps its traceback.

Example:
    >>> try:
    ...     raise DataError("data not found: photos/; pass a folder of class folders")
    ... except VisiontuneError as exc:
    ...     (exc.kind, exc.exit_code)
    ('data', 2)
"""

from __future__ import annotations


class VisiontuneError(Exception):
    """Base of visiontune's errors: a one-line message that names the remedy."""

    kind: str = "error"
    exit_code: int = 2

    def __init__(self, message: str, *, kind: str | None = None):
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class ConfigError(VisiontuneError):
    """An option, its value or a combination of options cannot be used."""

    kind = "config"


class DataError(VisiontuneError):
    """The dataset cannot be used as given."""

    kind = "data"


class ImageDecodeError(DataError):
    """One input could not be decoded as an image.

    ``kind`` is one of ``zero-size``, ``truncated``, ``non-image``, ``missing``,
    ``decompression-bomb`` or ``unreadable``.
    """

    kind = "unreadable"


class ModelError(VisiontuneError):
    """The model name or its weights cannot be used."""

    kind = "model"


class WeightsError(ModelError):
    """A weights file cannot be read, is unsafe, or does not fit the architecture."""

    kind = "weights"


class ArtifactError(VisiontuneError):
    """A path is not a usable visiontune model or run, or its files are inconsistent."""

    kind = "artifact"


class ExportError(VisiontuneError):
    """An export, an exported file or a compression result cannot be used."""

    kind = "export"


class TrainingInterrupted(VisiontuneError):
    """Training stopped on a signal after saving a checkpoint; the message says how to resume."""

    kind = "interrupted"
    exit_code = 130
