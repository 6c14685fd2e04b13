"""Multi-label metrics and thresholds (evaluation/multilabel.py): per-label F1-optimal thresholds
and the metrics against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visiontune.evaluation.multilabel_metrics import best_f1_threshold, multilabel_metrics, tune_thresholds


def test_best_f1_threshold_separates_where_f1_is_highest():
    probs = torch.tensor([0.9, 0.8, 0.35, 0.3, 0.1])
    target = torch.tensor([1, 1, 1, 0, 0])
    threshold, f1 = best_f1_threshold(probs, target)
    assert 0.3 < threshold < 0.35 and f1 == pytest.approx(1.0)
    # a label too rare on val falls back to the threshold shared by all decisions
    many = torch.tensor([[0.9, 0.6], [0.8, 0.2], [0.7, 0.1], [0.2, 0.3], [0.6, 0.05], [0.65, 0.4]])
    y = torch.tensor([[1, 1], [1, 0], [1, 0], [0, 0], [1, 0], [1, 0]])
    thresholds = tune_thresholds(many, y, min_support=2)
    assert thresholds[1] == best_f1_threshold(many.flatten(), y.flatten())[0]
    assert thresholds[0] == best_f1_threshold(many[:, 0], y[:, 0])[0]


def test_metrics_equal_sklearn_on_a_fixed_example():
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score, hamming_loss

    probs = torch.tensor([[0.9, 0.1, 0.6], [0.2, 0.8, 0.4], [0.7, 0.6, 0.1], [0.3, 0.2, 0.9], [0.1, 0.3, 0.2]])
    target = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]])
    thresholds = [0.5, 0.5, 0.3]
    m = multilabel_metrics(probs, target, ["a", "b", "c"], thresholds)
    y, p = target.numpy(), probs.numpy()
    pred = (p >= np.array(thresholds)).astype(int)
    assert m["macro_map"] == pytest.approx(average_precision_score(y, p, average="macro"), abs=1e-6)
    assert m["micro_map"] == pytest.approx(average_precision_score(y, p, average="micro"), abs=1e-6)
    assert m["micro_f1"] == pytest.approx(f1_score(y, pred, average="micro"), abs=1e-6)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-6)
    assert m["example_f1"] == pytest.approx(f1_score(y, pred, average="samples", zero_division=0), abs=1e-6)
    assert m["subset_accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["hamming_loss"] == pytest.approx(hamming_loss(y, pred))
    assert m["per_label"]["c"]["support"] == 2 and m["per_label"]["c"]["threshold"] == 0.3
