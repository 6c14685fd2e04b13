"""Every registered strategy (and head) passes one shared end-to-end test on generated images."""

from __future__ import annotations

import csv

import pytest
import torch
import yaml
from conftest import FAST, make_folder

import visiontune
from visiontune.data.image import load_image
from visiontune.data.scan import discover
from visiontune.inference.classifier import Classifier
from visiontune.models.factory import build_model
from visiontune.training.metrics import METRIC_COLUMNS
from visiontune.training.module import ClassifierModule
from visiontune.training.optim import OptimizerSettings, ScheduleSettings
from visiontune.training.registry import PROBE_HEADS, STRATEGIES

CASES = [(name, "linear") for name in STRATEGIES] + [("linear-probe", h) for h in PROBE_HEADS if h != "linear"]


@pytest.mark.parametrize("strategy,head", CASES)
def test_strategy_end_to_end(image_folder, tmp_path, strategy, head):
    epochs = 1 if head != "linear" else 2
    run = visiontune.train(image_folder, strategy=strategy, head=head, epochs=epochs, run_dir=str(tmp_path / "run"),
                           **FAST)
    rows = list(csv.DictReader(open(run.run_dir / "metrics.csv")))
    assert list(rows[0]) == METRIC_COLUMNS
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    for name in ("config.yaml", "curves.png", "skipped_files.txt", "model/model.safetensors", "model/model.json"):
        assert (run.run_dir / name).is_file(), name
    saved = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    assert saved["strategy"] == strategy and saved["run_dir"] == str(run.run_dir)
    assert 0.0 <= run.metrics["val"]["accuracy"] <= 1.0

    # reload parity: the saved model predicts what a fresh rebuild with the same weights computes
    clf = visiontune.load(run.run_dir)
    assert clf.class_names == ["blue", "green", "red"]
    assert clf.calibrated and clf.temperature > 0
    files = [p for p, _ in discover(image_folder, scan=False).val]
    rows = clf.predict(files)
    clf32 = Classifier.load(run.model_dir, precision="32")
    rows32 = clf32.predict(files)
    assert [r["label"] for r in rows] == [r["label"] for r in rows32]
    batch = torch.stack([clf.transform(load_image(f)) for f in files])
    model, _, _ = build_model("efficientnet_lite0", 3, weights="none")
    model.load_state_dict(clf.model.state_dict())
    with torch.no_grad():
        probs = torch.softmax(model.eval()(batch) / clf32.temperature, 1)  # calibrated on val after training
    got = torch.tensor([r["probability"] for r in rows32])
    torch.testing.assert_close(got, probs.max(1).values, atol=1e-4, rtol=1e-4)


def test_finetune_learns_easy_colours(image_folder, tmp_path):
    run = visiontune.train(image_folder, epochs=3, run_dir=str(tmp_path / "run"), **FAST)
    assert run.metrics["val"]["accuracy"] > 0.6  # chance is 1/3


def test_frozen_batchnorm_stays_in_eval_mode():
    model, arch, _ = build_model("efficientnet_lite0", 3)
    body = [n for n, _ in model.named_parameters() if not n.startswith(arch.classifier)]
    module = ClassifierModule(model, arch.classifier, [body], [1e-4], OptimizerSettings(), ScheduleSettings())
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(arch.classifier)
    module.train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(bn.training for bn in bns)
    before = bns[3].running_mean.clone()
    module.training_step((torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])), 0)
    torch.testing.assert_close(bns[3].running_mean, before)
    # unfrozen again: BatchNorm trains (bn_stats=train) and its statistics move
    for p in model.parameters():
        p.requires_grad = True
    module.train()
    assert all(bn.training for bn in bns)
    module.training_step((torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])), 0)
    assert not torch.allclose(bns[3].running_mean, before)


def test_auto_head_with_a_single_image_class_falls_back_to_logistic(tmp_path, capsys):
    """Stratified folds need two images per class; one lonely image must not crash --head auto."""
    make_folder(tmp_path / "data" / "train", per_class=6)
    make_folder(tmp_path / "data" / "val", per_class=2, seed=1)
    lonely = sorted((tmp_path / "data" / "train").iterdir())[0]
    for path in sorted(lonely.iterdir())[1:]:
        path.unlink()
    run = visiontune.train(tmp_path / "data", strategy="linear-probe", head="auto", run_dir=tmp_path / "run", **FAST)
    assert "too few to cross-validate: using the logistic head" in capsys.readouterr().out
    assert (run.model_dir / "model.safetensors").is_file()
