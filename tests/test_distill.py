"""Distillation (--teacher): the soft loss, the teacher answering for the student's batches at its own
size and normalisation, the refusals, and a run end to end recording its teacher in the model card."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST_FLAGS, make_folder, vt_main

from visiontune.core.errors import ConfigError
from visiontune.data.preprocess import Preprocessing
from visiontune.models.artifact import load_model
from visiontune.training.distill import Teacher, distill_loss, soft_loss


def test_soft_loss_is_zero_for_the_same_beliefs_and_pulls_the_student_to_the_teacher():
    teacher = torch.tensor([[3.0, 0.0, -1.0], [0.0, 2.0, 0.0]])
    assert soft_loss(teacher.clone(), teacher, 2.0).abs() < 1e-6
    student = torch.zeros(2, 3, requires_grad=True)
    loss = soft_loss(student, teacher, 2.0)
    loss.backward()
    assert loss > 0
    # a step against the gradient raises the student's logit where the teacher's is highest
    assert (-student.grad).argmax(1).tolist() == teacher.argmax(1).tolist()
    hard = torch.tensor(1.0)
    assert distill_loss(hard, teacher, teacher, 0.3, 2.0) == pytest.approx(0.7)


def test_temperature_keeps_the_soft_gradients_on_the_hard_scale():
    """The T^2 factor: the soft term's gradient norm stays within a small factor as T grows."""
    teacher = torch.tensor([[4.0, 0.0, -2.0]])
    norms = []
    for t in (1.0, 4.0):
        student = torch.zeros(1, 3, requires_grad=True)
        soft_loss(student, teacher, t).backward()
        norms.append(student.grad.norm().item())
    assert 0.2 < norms[1] / norms[0] < 5


def test_teacher_sees_the_students_batch_as_its_own_preprocessing_would(trained_run):
    """A batch normalised for the student (other mean/std) reaches the teacher with the teacher's."""
    run = trained_run[0].run_dir
    model, card = load_model(run)
    student_spec = Preprocessing((3, card.preprocessing.height, card.preprocessing.width), (0.1, 0.2, 0.3),
                                 (0.9, 0.8, 0.7))
    teacher = Teacher(run, student_spec, card.class_names)
    pixels = torch.rand(4, 3, card.preprocessing.height, card.preprocessing.width)
    s_mean, s_std = torch.tensor(student_spec.mean).view(1, 3, 1, 1), torch.tensor(student_spec.std).view(1, 3, 1, 1)
    t_mean = torch.tensor(card.preprocessing.mean).view(1, 3, 1, 1)
    t_std = torch.tensor(card.preprocessing.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model.eval()((pixels - t_mean) / t_std)
    torch.testing.assert_close(teacher((pixels - s_mean) / s_std), expected, atol=1e-4, rtol=1e-4)
    smaller = teacher(torch.rand(2, 3, 16, 16))  # a student at another size: resampled to the teacher's
    assert smaller.shape == (2, len(card.class_names))


def test_teacher_of_other_classes_is_refused(trained_run):
    run = trained_run[0].run_dir
    _, card = load_model(run)
    with pytest.raises(ConfigError, match="same classes"):
        Teacher(run, card.preprocessing, ["cat", "dog", "emu"])


def test_distillation_end_to_end_records_its_teacher(trained_run, tmp_path, capsys):
    run, data = trained_run[0].run_dir, trained_run[1]
    student = tmp_path / "student run"
    code, out, err = vt_main(capsys, "train", data, "--teacher", run, "--distill-alpha", "0.7", "--epochs", "2",
                             "--run-dir", student, "--no-report", *FAST_FLAGS)
    assert code == 0, err
    card = json.loads((student / "model" / "model.json").read_text())
    assert card["training"]["distillation"] == {"teacher": str(run), "alpha": 0.7, "temperature": 2.0}
    # a linear probe never trains on images: a teacher there is refused before any run dir exists
    probe = tmp_path / "probe run"
    code, out, err = vt_main(capsys, "train", data, "--teacher", run, "--strategy", "linear-probe", "--run-dir",
                             probe, *FAST_FLAGS)
    assert code != 0 and "--teacher distils into" in err and not probe.exists()
    other = make_folder(tmp_path / "other classes", per_class=4, classes={"x": (9, 9, 9), "y": (200, 9, 9)})
    code, out, err = vt_main(capsys, "train", other, "--teacher", run, "--epochs", "1", *FAST_FLAGS)
    assert code != 0 and "same classes" in err
