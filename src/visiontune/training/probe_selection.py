"""``--head auto``: the probe that repeated stratified k-fold cross-validation on the cached
features prefers, and its out-of-fold logits for calibration.

On a few hundred images a validation split of a few dozen cannot tell recipes apart (one image
is 2 points) and lets the best-looking one win by luck. Cross-validating probes costs seconds
on cached features, and every training image serves both as training and as evidence. The
candidates:

- ``logistic``: L2 logistic regression on standardised features, at several strengths;
- ``source``: L1 (sparse) logistic regression on the outputs of the backbone's own pretrained
  classifier (ImageNet's 1,000 classes for the embedded default) where they are known. A class
  the pretrained classifier already separates needs a handful of its outputs, which a sparse
  model finds from few images (measured on hymenoptera, 245 images, repeated 5-fold: 98.8% vs
  96.2% for the best logistic probe on features).

Whatever wins is folded into the model's own classifier layer (a linear map of the features), so
the model saves, loads and exports as always.

Example:
    >>> rng = np.random.default_rng(0)
    >>> x = np.concatenate([rng.normal(0, 1, (30, 8)), rng.normal(2, 1, (30, 8))]); y = np.repeat([0, 1], 30)
    >>> result = select_probe(x, y, source=None, seed=0)
    >>> result.best.inputs, result.mean > 0.9
    ('features', True)
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

FOLDS, REPEATS = 5, 3
ONE_PASS_FROM = 500  # from this many images one k-fold pass estimates well enough: repeats cost, not inform
# projected seconds per (image, class, repeat) of the whole selection, the sparse one-vs-rest source
# probes being most of it (measured on a 2-core AVX2 CPU: 80 images x 10 classes 7 s, 800 x 10 50 s)
SECONDS_PER_IMAGE_CLASS = 0.0025
FEATURE_C = (0.01, 0.1, 1.0)
SOURCE_C = (0.01, 0.03, 0.1, 0.3, 1.0)


@dataclass(frozen=True)
class Candidate:
    """One probe: its inputs (``features`` or ``source`` logits) and regularisation strength."""

    inputs: str
    C: float

    @property
    def name(self) -> str:
        return f"{'logistic on features' if self.inputs == 'features' else 'sparse logistic on source logits'} " \
               f"(C={self.C:g})"


@dataclass
class Selection:
    """The cross-validation's verdict: every candidate's mean and spread, the best one's out-of-fold logits."""

    best: Candidate
    mean: float
    std: float
    table: list[tuple[str, float, float]]
    oof_logits: np.ndarray
    folds: int
    repeats: int

    def summary(self) -> dict:
        table = [{"probe": n, "cv_accuracy": round(m, 4), "cv_std": round(s, 4)} for n, m, s in self.table]
        return {"chosen": self.best.name, "cv_accuracy": round(self.mean, 4), "cv_std": round(self.std, 4),
                "folds": self.folds, "repeats": self.repeats, "candidates": table}


def repeats_for(n: int) -> int:
    """Repeats of the k-fold cross-validation for ``n`` training images."""
    return REPEATS if n < ONE_PASS_FROM else 1


def selection_seconds(n: int, num_classes: int) -> float:
    """Projected seconds of :func:`select_probe` on ``n`` images of ``num_classes`` classes (a binary
    problem fits one model per probe, more classes one per class)."""
    return 1.0 + SECONDS_PER_IMAGE_CLASS * n * (num_classes if num_classes > 2 else 1) * repeats_for(n)


def one_thread():
    """A context in which scikit-learn's BLAS and OpenMP pools run on one thread: beside torch's own
    pools they oversubscribe the cores, and small fits wait on each other (80 images x 10 classes:
    19 s on all threads, 7 s on one). Every scikit-learn head fits inside it."""
    from threadpoolctl import threadpool_limits  # scikit-learn's own dependency

    return threadpool_limits(1)


@contextmanager
def _one_thread():
    """:func:`one_thread`, without liblinear's notes."""
    with one_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # liblinear's convergence notes on tiny folds are not actionable
        yield


def candidates(has_source: bool) -> list[Candidate]:
    return ([Candidate("features", c) for c in FEATURE_C]
            + ([Candidate("source", c) for c in SOURCE_C] if has_source else []))


def _estimator(candidate: Candidate, seed: int, balanced: bool, num_classes: int):
    # lazy: scikit-learn loads only for the probes
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    weight = "balanced" if balanced else None
    if candidate.inputs == "features":
        return make_pipeline(StandardScaler(), LogisticRegression(C=candidate.C, max_iter=3000, random_state=seed,
                                                                  class_weight=weight))
    # liblinear finds sparse solutions fast, one class against the rest (it has no multinomial mode)
    sparse = LogisticRegression(C=candidate.C, l1_ratio=1.0, solver="liblinear", max_iter=3000, random_state=seed,
                                class_weight=weight)
    return sparse if num_classes <= 2 else OneVsRestClassifier(sparse)


def _coefficients(clf) -> tuple[np.ndarray, np.ndarray]:
    """(coef ``[k or 1, d]``, intercept) of a fitted logistic model, one-vs-rest or not."""
    if hasattr(clf, "estimators_"):
        return (np.concatenate([e.coef_ for e in clf.estimators_]),
                np.concatenate([e.intercept_ for e in clf.estimators_]))
    return np.asarray(clf.coef_), np.asarray(clf.intercept_)


def _inputs(candidate: Candidate, x: np.ndarray, source: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    return x if candidate.inputs == "features" else x @ source[0].T + source[1]


def as_logits(scores: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """scikit-learn decision scores as one logit per class ([0, s] for a binary model)."""
    out = np.full((len(scores), num_classes), -1e4)
    if scores.ndim == 1:
        out[:, classes[0]], out[:, classes[1]] = 0.0, scores
    else:
        out[:, classes] = scores
    return out


def select_probe(x: np.ndarray, y: np.ndarray, source: tuple[np.ndarray, np.ndarray] | None, seed: int = 0,
                 balanced: bool = False) -> Selection:
    """Repeated stratified k-fold accuracy of every candidate (:func:`repeats_for` repeats); the best
    one's out-of-fold logits."""
    from sklearn.model_selection import RepeatedStratifiedKFold, StratifiedKFold, cross_val_predict, cross_val_score

    folds = int(max(2, min(FOLDS, np.bincount(y)[np.bincount(y) > 0].min())))
    k = len(np.unique(y))
    repeats = repeats_for(len(y))
    cv = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    table, best = [], None
    with _one_thread():
        for candidate in candidates(source is not None):
            scores = cross_val_score(_estimator(candidate, seed, balanced, k), _inputs(candidate, x, source), y, cv=cv)
            table.append((candidate.name, float(scores.mean()), float(scores.std())))
            if best is None or scores.mean() > best[1] + 1e-9:
                best = (candidate, float(scores.mean()), float(scores.std()))
        candidate = best[0]
        oof = cross_val_predict(_estimator(candidate, seed, balanced, k), _inputs(candidate, x, source), y,
                                cv=StratifiedKFold(folds, shuffle=True, random_state=seed), method="decision_function")
    oof_logits = as_logits(oof, np.unique(y), int(y.max()) + 1)
    return Selection(candidate, best[1], best[2], table, oof_logits, folds, repeats)


def fit_linear(candidate: Candidate, x: np.ndarray, y: np.ndarray, source: tuple[np.ndarray, np.ndarray] | None,
               num_classes: int, seed: int = 0, balanced: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Fit ``candidate`` on all of ``x`` and fold it into one linear layer on the features:
    (weight ``[num_classes, d]``, bias ``[num_classes]``)."""
    est = _estimator(candidate, seed, balanced, len(np.unique(y)))
    with _one_thread():
        est.fit(_inputs(candidate, x, source), y)
    if candidate.inputs == "features":
        scaler, clf = est[0], est[-1]
        a = np.diag(1.0 / scaler.scale_)
        c = -scaler.mean_ / scaler.scale_
    else:
        clf, (a, c) = est, source
    coef, intercept = (np.asarray(v, np.float64) for v in _coefficients(clf))
    w, b = coef @ a, coef @ c + intercept  # logits = coef (A f + c) + intercept
    weight = np.zeros((num_classes, x.shape[1]), dtype=np.float32)
    bias = np.full(num_classes, -1e4 if len(clf.classes_) < num_classes else 0.0, dtype=np.float32)
    if coef.shape[0] == 1:  # binary: one score s for classes_[1]; logits [0, s]
        weight[clf.classes_[1]], bias[clf.classes_[1]] = w[0], b[0]
        bias[clf.classes_[0]] = 0.0
    else:
        for row, cls in enumerate(clf.classes_):
            weight[cls], bias[cls] = w[row], b[row]
    return weight, bias
