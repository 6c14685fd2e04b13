"""The cross-validated small-data probe (training/probe_selection.py): its repeats, its projected
cost, its thread pools, and the fitted probe folded into one linear layer."""

from __future__ import annotations

import numpy as np
import pytest

from visiontune.training import probe_selection as ps


def blobs(n_per_class: int, classes: int, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    return rng.normal(0, 1, (len(y), dim)) + 3 * np.eye(classes, dim)[y], y


def test_few_images_get_repeated_folds_and_many_get_one_pass():
    x, y = blobs(10, 3)
    assert ps.select_probe(x, y, source=None).repeats == ps.REPEATS
    x, y = blobs(ps.ONE_PASS_FROM // 2, 2)
    result = ps.select_probe(x, y, source=None)
    assert result.repeats == 1 and result.folds == ps.FOLDS and result.oof_logits.shape == (len(y), 2)


def test_projected_selection_cost_follows_images_classes_and_repeats():
    assert ps.selection_seconds(200, 10) > ps.selection_seconds(200, 2)  # one model per class beyond two
    assert ps.selection_seconds(200, 10) > ps.selection_seconds(100, 10)
    below, above = ps.ONE_PASS_FROM - 1, ps.ONE_PASS_FROM
    assert ps.selection_seconds(above, 10) < ps.selection_seconds(below, 10)  # repeats end there


def test_scikit_learn_runs_on_one_thread_inside_the_selection_only():
    from threadpoolctl import threadpool_info

    before = [pool["num_threads"] for pool in threadpool_info()]
    with ps._one_thread():
        assert {pool["num_threads"] for pool in threadpool_info()} == {1}
    assert [pool["num_threads"] for pool in threadpool_info()] == before  # torch's pools get theirs back


@pytest.mark.parametrize("classes", [2, 4])
def test_the_chosen_probe_folds_into_a_linear_layer_with_its_own_decisions(classes):
    x, y = blobs(12, classes)
    rng = np.random.default_rng(1)
    source = (rng.normal(0, 1, (7, x.shape[1])), rng.normal(0, 1, 7))  # a pretrained head's 7 outputs
    for candidate in (ps.Candidate("features", 0.1), ps.Candidate("source", 1.0)):
        weight, bias = ps.fit_linear(candidate, x, y, source, classes)
        est = ps._estimator(candidate, 0, False, classes)
        est.fit(ps._inputs(candidate, x, source), y)
        expected = ps.as_logits(est.decision_function(ps._inputs(candidate, x, source)), np.unique(y), classes)
        np.testing.assert_allclose(x @ weight.T + bias, expected, rtol=1e-3, atol=1e-3)
