"""``train --unlabeled``: the pseudo-label threshold and the class-balanced selection, a tiny
self-training end to end (teacher, pseudo-labels, student, the better kept and recorded), and the
bad inputs refused before anything trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FAST, FAST_FLAGS, make_folder, make_multilabel, vt_main

import visiontune
from visiontune.core.errors import ConfigError
from visiontune.models.artifact import read_card
from visiontune.pipeline.self_training import confident_threshold, select


def test_threshold_is_where_val_answers_reach_the_precision():
    probs = torch.tensor([[0.99, 0.01], [0.9, 0.1], [0.3, 0.7], [0.45, 0.55], [0.6, 0.4]])
    target = torch.tensor([0, 0, 1, 0, 1])  # right, right, right, wrong, wrong (by decreasing top probability)
    assert confident_threshold(probs, target, precision=1.0) == pytest.approx(0.7)
    assert confident_threshold(probs, target, precision=0.6) == pytest.approx(0.55)
    assert confident_threshold(probs[3:], target[3:], precision=0.9) == 1.0  # never right: nothing passes


def test_selection_is_confident_accepted_and_capped_per_class():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(200, 4, generator=g), dim=1)
    probs[:, 0] += 0.5  # class 0 favoured
    probs = probs / probs.sum(1, keepdim=True)
    accepted = torch.rand(200, generator=g) > 0.2
    kept = select(probs, accepted, 0.6)
    top, pred = probs.max(1)
    assert kept == sorted(set(kept)) and all(accepted[i] and top[i] >= 0.6 for i in kept)
    counts = torch.bincount(pred[kept], minlength=4).tolist()
    confident = [int(((pred == c) & accepted & (top >= 0.6)).sum()) for c in range(4)]
    cap = sorted(c for c in confident if c)[len([c for c in confident if c]) // 2]  # the median (odd or upper)
    assert max(counts) <= cap and counts[0] < confident[0]  # the favoured class is capped
    for c in range(4):  # each class keeps its most confident
        chosen = [float(top[i]) for i in kept if pred[i] == c]
        others = [float(top[i]) for i in range(200) if pred[i] == c and accepted[i] and top[i] >= 0.6
                  and i not in kept]
        assert not chosen or not others or min(chosen) >= max(others)
    assert select(probs, torch.zeros(200, dtype=torch.bool), 0.0) == []


def test_self_training_keeps_the_better_model_and_records_it(shared_folder, tmp_path, capsys, monkeypatch):
    """A tiny run with every unlabelled image confident enough (precision 0): the teacher, the
    pseudo-labels, a student, and the run's model is the better on the teacher's val split; its
    card and self_training.json say how many pseudo-labels were used and which model was kept."""
    monkeypatch.setattr("visiontune.pipeline.self_training.MIN_PRECISION", 0.0)
    pool = make_folder(tmp_path / "unlabelled images", per_class=4, seed=5)
    run_dir = tmp_path / "self run"
    code, out, err = vt_main(capsys, "train", shared_folder, "--unlabeled", pool, "--epochs", "1",
                             "--freeze-epochs", "0", "--strategy", "finetune", "--run-dir", run_dir, *FAST_FLAGS,
                             "--no-report")
    assert code == 0, err
    facts = json.loads((run_dir / "self_training.json").read_text())
    assert facts["unlabeled"] == facts["scored"] == 12 and 0 < facts["pseudo_labels"] <= 12
    assert sum(facts["per_class"].values()) == facts["pseudo_labels"]
    assert facts["kept"] in ("student", "teacher") and ("fallback" in facts) == (facts["kept"] == "teacher")
    card = read_card(run_dir / "model")
    assert card.training["self_training"] == facts
    kept = max(facts["teacher_val"], facts["student_val"]) if facts["kept"] == "student" else facts["teacher_val"]
    assert card.metrics["val"]["accuracy"] == pytest.approx(kept)  # never below the teacher on val
    assert (facts["student_val"] >= facts["teacher_val"]) == (facts["kept"] == "student")  # a tie keeps the student
    # the evidence behind the choice: the val images only one of the two answers right, each side's count
    split = facts["val_disagreements"]
    n_val = len((run_dir / "teacher" / "splits" / "val.csv").read_text().splitlines()) - 1
    assert set(split) == {"student", "teacher"} and 0 <= split["student"] + split["teacher"] <= n_val
    assert f"of the {n_val} val images, the student alone answers {split['student']} right" in out
    if facts["kept"] == "teacher":
        assert str(run_dir / "student" / "model") in facts["fallback"]  # where the rejected student stays
    student_train = (run_dir / "student" / "splits" / "train.csv").read_text().splitlines()
    teacher_train = (run_dir / "teacher" / "splits" / "train.csv").read_text().splitlines()
    assert len(student_train) == len(teacher_train) + facts["pseudo_labels"]
    assert (run_dir / "student" / "splits" / "val.csv").read_text() == (
        run_dir / "teacher" / "splits" / "val.csv").read_text()  # judged on the labelled val alone
    assert "pseudo-labels kept" in out and f"run: {run_dir}" in out
    # the teacher fine-tuned its network: the student starts from it, classifier included
    student_cfg = yaml.safe_load((run_dir / "student" / "config.yaml").read_text())
    assert facts["student_start"] == "teacher" and "from the teacher's weights" in out
    assert student_cfg["weights"] == str((run_dir / "teacher" / "model").resolve())
    assert student_cfg["model"] == read_card(run_dir / "teacher" / "model").architecture.model_name
    assert visiontune.load(run_dir).predict([next(pool.rglob("*.png"))])[0]["label"]


def test_the_student_starts_from_a_fine_tuned_teacher_only(tmp_path):
    """A teacher that fine-tuned its network starts the student (``--weights`` the teacher's model);
    a probe's or a from-scratch teacher's does not."""
    from visiontune.models.artifact import save_model
    from visiontune.models.card import ModelCard
    from visiontune.models.factory import build_model
    from visiontune.pipeline.self_training import student_start

    model, arch, pre = build_model("resnet18", 3, weights="none")
    for strategy, expected in (("finetune", True), ("progressive", True), ("linear-probe", False),
                               ("scratch", False)):
        folder = tmp_path / strategy
        save_model(folder, model, ModelCard(["a", "b", "c"], pre.with_size(48), arch, training={"strategy": strategy}))
        assert student_start(folder) == ({"weights": str(folder)} if expected else {})
        # a teacher that measured its test-time augmentation: the student measures its own (unless --tta is given)
        choice = {"mode": "flip-zoom", "measured": "flip-zoom", "accuracy": 0.8, "one_view": 0.7, "gain": 0.1}
        save_model(folder, model, ModelCard(["a", "b", "c"], pre.with_size(48), arch,
                                            training={"strategy": strategy, "tta_choice": choice}))
        assert student_start(folder) == {"tta": "auto", **({"weights": str(folder)} if expected else {})}
        assert "tta" not in student_start(folder, {"tta", "time"})


def test_a_budget_too_short_for_self_training_trains_on_the_labelled_images_alone(trained_run, tmp_path, capsys):
    """Under MIN_BUDGET_S the teacher's third would leave the student too little and the teacher, short
    of the labelled-only run's time, would be the model: one labelled-only run in the whole budget,
    said and recorded."""
    import shutil
    import time
    from dataclasses import replace

    from visiontune.pipeline.self_training import MIN_BUDGET_S, self_train
    from visiontune.training.config import TrainConfig

    run, data = trained_run
    pool = make_folder(tmp_path / "pool", per_class=1, seed=3)
    seen = []

    def train_run(cfg, started):  # stands in for a real run: what matters is which runs are asked for
        seen.append(cfg)
        shutil.copytree(run.run_dir, cfg.runtime.run_dir)
        return replace(run, run_dir=Path(cfg.runtime.run_dir), model_dir=Path(cfg.runtime.run_dir) / "model")

    short = f"{int(MIN_BUDGET_S) - 1}s"
    cfg = TrainConfig.from_dict({"data": str(data), "unlabeled": str(pool), "time": short,
                                 "run_dir": str(tmp_path / "short run")})
    out = self_train(cfg, time.time(), train_run)
    assert len(seen) == 1 and seen[0].data.unlabeled is None and seen[0].runtime.time == short
    facts = json.loads((tmp_path / "short run" / "self_training.json").read_text())
    assert facts["kept"] == "labelled-only" and "too short for self-training" in facts["fallback"]
    assert read_card(tmp_path / "short run" / "model").training["self_training"] == facts
    assert out.metrics["self_training"] == facts and "in the whole budget" in capsys.readouterr().out


def test_unlabeled_bad_inputs_are_refused_before_anything_trains(shared_folder, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    overlap = make_folder(tmp_path / "mixed", per_class=2, seed=9)
    (overlap / "labelled.png").symlink_to(next(shared_folder.rglob("*.png")))
    ml_csv = make_multilabel(tmp_path / "ml")
    for data, folder, message in ((shared_folder, empty, "no images found"),
                                  (shared_folder, overlap, "are labelled images of"),
                                  (ml_csv, make_folder(tmp_path / "pool", per_class=1), "single-label data")):
        run_dir = tmp_path / f"run-{folder.name}"
        code, _, err = vt_main(capsys, "train", data, "--unlabeled", folder, "--run-dir", run_dir, *FAST_FLAGS)
        assert code == 2 and message in err and "Traceback" not in err
        assert not run_dir.exists()  # nothing written, nothing lost
    with pytest.raises(ConfigError, match="--resume"):
        visiontune.train(shared_folder, unlabeled=str(overlap), resume=str(tmp_path), **FAST)
