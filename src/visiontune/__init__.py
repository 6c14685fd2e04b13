"""visiontune: turn a folder of labelled images into a production-grade image classifier.

Example:
    >>> import visiontune
    >>> run = visiontune.train("data/hymenoptera/train", epochs=3)   # doctest: +SKIP
    >>> clf = visiontune.load(run.run_dir)                          # doctest: +SKIP
    >>> clf.predict(["ant.jpg"])[0]["label"]                         # doctest: +SKIP
    'ants'
    >>> visiontune.evaluate(clf, "data/hymenoptera/val")["accuracy"] # doctest: +SKIP
    0.95
"""

from __future__ import annotations

import os

from .core.version import __version__


def train(data=None, **options):
    """Fine-tune a classifier; see :func:`visiontune.pipeline.train.train`."""
    from .pipeline.train import train as _train  # lazy: `import visiontune` stays light

    return _train(data, **options)


def load(path: str | os.PathLike, precision: str = "auto", tta: bool | str | None = None):
    """Load a run dir, ``model/`` dir, pruned model dir or exported ``.onnx`` as a classifier
    (``tta``: override the test-time augmentation the model was trained with: ``"none"``,
    ``"flip"`` or ``"flip-zoom"``; True is ``"flip"``).

    Example:
        clf = visiontune.load("runs/train-1")
        clf.predict(["ant.jpg"])[0]["label"]
        # -> 'ants'
    """
    from .inference.classifier import Classifier  # lazy: as above

    return Classifier.load(path, precision, tta)


def evaluate(model, data, **options):
    """Score a model on labelled data, taking ``visiontune evaluate``'s options by name; see
    :func:`visiontune.pipeline.scoring.evaluate`."""
    from .pipeline.scoring import evaluate as _evaluate  # lazy: as above

    return _evaluate(model, data, **options)


def predict(model, inputs, **options):
    """Classify images, taking ``visiontune predict``'s options by name; see
    :func:`visiontune.pipeline.scoring.predict`."""
    from .pipeline.scoring import predict as _predict  # lazy: as above

    return _predict(model, inputs, **options)


def suggest(run, pool, **options):
    """Rank unlabelled images to label next, taking ``visiontune suggest``'s options by name; see
    :func:`visiontune.pipeline.suggest.suggest`."""
    from .pipeline.suggest import suggest as _suggest  # lazy: as above

    return _suggest(run, pool, **options)


__all__ = ["__version__", "evaluate", "load", "predict", "suggest", "train"]
