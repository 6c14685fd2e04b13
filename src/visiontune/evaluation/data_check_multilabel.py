"""The multi-label parts of ``visiontune data check``: label frequency and co-occurrence, and
likely label errors by ``cleanlab.multilabel_classification`` on out-of-fold probabilities of a
one-vs-rest logistic regression on cached backbone features (iteratively stratified folds).

Example:
    >>> cooccurrence([("a", "b"), ("a", "b"), ("a",), ()], ["a", "b"])
    [{'labels': ['a', 'b'], 'images': 2}]
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from ..data.label_tables import LabelTable
from ..data.labels import multi_hot
from ..task import MultiLabel

TOP_PAIRS = 20  # co-occurring label pairs listed
MIN_FOLD_IMAGES = 2  # held-out images per fold, at the least, for the label search


def read_multilabel(data: Path, val: Path | None, tables: list[LabelTable]
                    ) -> tuple[list[tuple[str, str, tuple[str, ...]]], list[str], list[str]]:
    """([(path, split, its labels)], the labels of the training images, split names) of the label
    tables of a multi-label ``data`` CSV and its ``val`` CSV."""
    files = [(p, split, tuple(labels)) for split, table in zip(("train", "val"), tables) for p, labels in table.rows]
    names = sorted({x for _, split, labels in files if split == "train" for x in labels})
    return files, names, ["train", "val"][:len(tables)]


def multilabel_summary(label_sets: list[tuple[str, ...]], names: list[str]) -> dict[str, Any]:
    """The multi-label entries of a data check report: labels per training image and label pairs."""
    return {"task": MultiLabel.name, "labels_per_image": cardinality(label_sets),
            "cooccurrence": cooccurrence(label_sets, names)}


def cooccurrence(label_sets: list[tuple[str, ...]], names: list[str], top: int = TOP_PAIRS) -> list[dict[str, Any]]:
    """The label pairs found together in the most images (most first)."""
    counts: dict[tuple[str, str], int] = {}
    for labels in label_sets:
        for pair in combinations(sorted(labels), 2):
            counts[pair] = counts.get(pair, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return [{"labels": list(pair), "images": n} for pair, n in ranked]


def cardinality(label_sets: list[tuple[str, ...]]) -> dict[str, int]:
    """How many images have 0, 1, 2, ... labels."""
    out: dict[str, int] = {}
    for labels in label_sets:
        out[str(len(labels))] = out.get(str(len(labels)), 0) + 1
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def out_of_fold_multilabel(features: np.ndarray, y: np.ndarray, folds: int = 5,
                           seed: int = 0) -> tuple[np.ndarray, int]:
    """Out-of-fold probabilities ``[N, C]`` of a standardised one-vs-rest logistic regression."""
    # lazy: scikit-learn and the stratifier load only when the label check runs
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_splits = int(max(2, min(folds, len(y) // MIN_FOLD_IMAGES)))
    probs = np.zeros(y.shape, dtype=np.float64)
    cv = MultilabelStratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for train, held in cv.split(features, y):
        clf = make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(C=0.5, max_iter=2000)))
        probs[held] = clf.fit(features[train], y[train]).predict_proba(features[held])
    return probs, n_splits


def find_multilabel_errors(samples, names, split_of, features: np.ndarray, folds: int, seed: int
                           ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(ranked label issues, method summary) for multi-hot ``samples`` with their ``features``."""
    from cleanlab.multilabel_classification.filter import find_label_issues  # lazy: as above

    if len(samples) < 2 * MIN_FOLD_IMAGES:
        return [], {"skipped": f"needs at least {2 * MIN_FOLD_IMAGES} readable images"}
    y = np.stack([label.numpy() for _, label in samples]).astype(int)
    probs, n_splits = out_of_fold_multilabel(features, y, folds, seed)
    given = [list(np.flatnonzero(row)) for row in y]
    ranked = find_label_issues(given, probs, return_indices_ranked_by="self_confidence")
    issues = []
    for i in ranked:
        i = int(i)
        path = samples[i][0]
        issues.append({"path": path, "split": split_of[path], "labels": [names[c] for c in given[i]],
                       "suggested": [names[c] for c in np.flatnonzero(probs[i] >= 0.5)],
                       "probabilities": {names[c]: round(float(probs[i, c]), 4) for c in range(len(names))}})
    decided = (probs >= 0.5).astype(int)
    summary = {"method": "cleanlab.multilabel_classification.find_label_issues (self_confidence)",
               "folds": n_splits, "num_images": len(samples),
               "out_of_fold_accuracy": round(float((decided == y).mean()), 4)}  # label decisions right
    return issues, summary


def multilabel_samples(paths: list[str], label_of: dict[str, tuple[str, ...]], names: list[str]) -> list:
    index = {n: i for i, n in enumerate(names)}
    return [(p, multi_hot([index[x] for x in label_of[p] if x in index], len(names))) for p in paths]
