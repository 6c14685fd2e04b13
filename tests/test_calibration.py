"""Temperature calibration (evaluation/calibration.py): the fitted temperature, never sharpening
without errors, multi-label calibration over every (image, label) decision, and the ECE evaluate reports."""

from __future__ import annotations

import pytest
import torch

from visiontune.evaluation.calibration import ECE_BINS, expected_calibration_error, fit_temperature


def test_calibration_over_label_decisions_softens_an_overconfident_model():
    from visiontune.evaluation.calibration import label_decisions, multilabel_calibration

    gen = torch.Generator().manual_seed(0)
    target = (torch.rand(400, 4, generator=gen) < 0.3).float()
    honest = torch.where(target > 0, 1.0, -1.0) + torch.randn(400, 4, generator=gen)  # noisy evidence
    cal = multilabel_calibration(honest * 6, target)  # six times too sharp
    assert cal["temperature"] > 1.0 and cal["ece_after"] < cal["ece_before"]
    assert cal["decisions"] == 1600 and cal["num_val"] == 400
    z, y = label_decisions(honest, target)
    assert torch.allclose(torch.softmax(z, 1)[:, 1].float(), torch.sigmoid(honest).reshape(-1), atol=1e-6)
    assert torch.equal(y, target.reshape(-1).long())


def test_fit_temperature_recovers_known_temperature():
    gen = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 5, generator=gen) * 2
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=gen).squeeze(1)
    overconfident = true_logits * 3  # calibrated at T = 3
    t = fit_temperature(overconfident, labels)
    assert 2.7 < t < 3.3
    before = expected_calibration_error(torch.softmax(overconfident, 1), labels)
    after = expected_calibration_error(torch.softmax(overconfident / t, 1), labels)
    assert after < 0.03 < before
    perfect = torch.tensor([[0.9, 0.1]] * 10)
    assert expected_calibration_error(perfect, torch.tensor([0] * 9 + [1])) == pytest.approx(0.0, abs=1e-6)


def test_calibration_never_sharpens_without_errors_and_keeps_few_errors_doubtful():
    """No error: T >= 1 (a set answered all right cannot show by how much to sharpen). A few
    errors: T may sharpen an under-confident model, but no wrong answer rises above p = 0.99."""
    from visiontune.evaluation.calibration import MAX_WRONG_CONFIDENCE, calibration_summary

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 2
    margins = 0.5 + torch.rand(200, generator=gen)  # right answers, timid logits: under-confident
    logits = torch.stack([-margins / 2, margins / 2], 1)
    logits[labels == 0] = logits[labels == 0].flip(1)
    all_right = calibration_summary(logits, labels)
    assert all_right["errors"] == 0 and all_right["temperature"] >= 1.0
    few = logits.clone()
    few[:3] = few[:3].flip(1) * 2  # three confident mistakes
    entry = calibration_summary(few, labels)
    t = entry["temperature"]
    assert entry["errors"] == 3 and t < 1.0  # sharpened: the right answers were timid
    wrong = few.argmax(1) != labels
    assert float(torch.softmax(few[wrong].double() / t, 1).max()) <= MAX_WRONG_CONFIDENCE + 1e-6
    assert entry["ece_after"] < entry["ece_before"]
    low, high = entry["temperature_range"]  # rounded to 4 decimals
    assert low - 1e-4 <= t <= high + 1e-4


def test_evaluate_reports_the_held_out_calibration_error():
    """Evaluation metrics carry the ECE of the probabilities they scored: two sure and right answers
    add nothing; two answers at 0.9 of which one is right are 0.4 off for half the images."""
    from visiontune.evaluation.singlelabel_metrics import compute_metrics

    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.9, 0.1]])
    m = compute_metrics(probs, torch.tensor([0, 1, 0, 1]), ["a", "b"])
    assert m["ece"] == pytest.approx(0.2, abs=1e-6) and m["ece_bins"] == ECE_BINS
    assert compute_metrics(probs[:2], torch.tensor([0, 1]), ["a", "b"])["ece"] == pytest.approx(0.0, abs=1e-6)
