"""Training invariants beyond test_strategies.py: frozen layers stay bit-identical (weights and
BatchNorm statistics), the saved model is the recorded best epoch, and a matrix of options each
produce a consistent run whose reloaded model matches a fresh forward pass."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from conftest import CLASS_NAMES, FAST, reference_probabilities, rows_probabilities
from safetensors.torch import load_file
from torch import nn

import visiontune
from visiontune.inference.classifier import Classifier
from visiontune.models.factory import build_model
from visiontune.models.groups import body_groups
from visiontune.training.callbacks import FreezeSchedule
from visiontune.training.config import TrainConfig
from visiontune.training.metrics import METRIC_COLUMNS
from visiontune.training.module import ClassifierModule
from visiontune.training.optim import MIN_LR_FACTOR, OptimizerSettings, ScheduleSettings
from visiontune.training.setup import fit, setup_run

TINY = FAST


@pytest.fixture(scope="module")
def data(shared_folder):
    return shared_folder


@pytest.fixture(scope="module")
def pretrained():
    model, arch, _ = build_model("efficientnet_lite0", num_classes=3)
    return model.state_dict(), arch, body_groups(model, arch.classifier)


def metric_rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == METRIC_COLUMNS
        return list(reader)


def check_run_consistency(run, data_root, max_epochs: int):
    """Invariants every finished run must satisfy, whatever the options."""
    rows = metric_rows(run.run_dir)
    epochs = [int(r["epoch"]) for r in rows]
    assert epochs == list(range(1, len(rows) + 1)) and 1 <= len(rows) <= max_epochs
    clf = visiontune.load(run.run_dir)
    score = ["unknown.safetensors"] if clf.card.unknown else []  # the unknown-score's statistics, when fitted
    assert sorted(p.name for p in run.model_dir.iterdir()) == ["README.md", "model.json", "model.safetensors", *score]
    assert clf.class_names == CLASS_NAMES
    # the saved model is the one whose validation score was recorded: re-scoring reproduces it
    recorded = clf.card.metrics
    assert recorded["val"]["accuracy"] == pytest.approx(recorded["val_accuracy"], abs=1e-6)
    assert 1 <= recorded["epoch"] <= len(rows)
    assert float(rows[recorded["epoch"] - 1]["val_accuracy"]) == pytest.approx(recorded["val_accuracy"], abs=1e-4)
    # reload parity on a few files: Classifier == fresh network + saved weights + saved preprocessing
    files = sorted(str(p) for p in data_root.rglob("*.png"))[::5]
    out = clf.predict(files, top_k=len(CLASS_NAMES), batch_size=4)
    probs, meta = reference_probabilities(run.model_dir, files)
    torch.testing.assert_close(rows_probabilities(out, meta["class_names"]), probs, atol=1e-5, rtol=1e-4)
    assert [r["label"] for r in out] == [meta["class_names"][i] for i in probs.argmax(1).tolist()]
    return rows, clf


# --- frozen layers -----------------------------------------------------------------------------


def _buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-body", "trainable-body"])
def test_freeze_schedule_puts_frozen_batchnorm_in_eval_mode(frozen):
    """ClassifierModule.train() after FreezeSchedule froze the body (a frozen warm-up epoch)."""
    model, arch, _ = build_model("efficientnet_lite0", num_classes=3)
    groups = body_groups(model, arch.classifier)
    module = ClassifierModule(model, arch.classifier, groups, [1e-3] * len(groups), OptimizerSettings(),
                              ScheduleSettings())
    schedule = FreezeSchedule(lambda epoch: 0 if frozen else len(groups), verbose=False)
    schedule.freeze_before_training(module)
    schedule.finetune_function(module, 0, None)
    module.train()  # what Lightning does at every epoch start
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    assert bns and all(m.training != frozen for m in bns)
    assert model.get_submodule(arch.classifier).training

    before = _buffers(model)
    head_before = model.get_submodule(arch.classifier).weight.detach().clone()
    stem_before = model.conv_stem.weight.detach().clone()
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
    torch.manual_seed(0)
    loss = module.loss_fn(module(torch.randn(4, 3, 32, 32) * 3 + 1), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    after = _buffers(model)
    assert not torch.equal(model.get_submodule(arch.classifier).weight, head_before)
    if frozen:
        assert all(torch.equal(after[k], v) for k, v in before.items())
        assert torch.equal(model.conv_stem.weight, stem_before)
    else:  # control: trainable BatchNorm layers do update their statistics
        assert any(not torch.equal(after[k], v) for k, v in before.items() if "running_mean" in k)


def test_progressive_leaves_frozen_groups_bit_identical(tmp_path, data, pretrained):
    """Warm-up epoch, then one Lightning epoch in which only the top body group trains: every
    parameter and BatchNorm statistic of the other groups keeps its pretrained value."""
    reference, arch, groups = pretrained
    cfg = TrainConfig.from_dict({"data": str(data), "strategy": "progressive", "epochs": 2, "freeze_epochs": 1,
                                 "unfreeze_every": 5, "run_dir": str(tmp_path / "run"), **TINY})
    ctx = setup_run(cfg)
    fit(ctx)
    trained = ctx.model.state_dict()  # the weights after the last epoch, not the best-epoch copy
    assert len(metric_rows(ctx.run_dir)) == 2

    frozen_params = [n for g in groups[:-1] for n in g]
    frozen_modules = {n.rpartition(".")[0] for n in frozen_params}
    for name in frozen_params:
        assert torch.equal(trained[name], reference[name]), name
    stats = [k for k in reference
             if k.rpartition(".")[0] in frozen_modules and k.rpartition(".")[2] in ("running_mean", "running_var")]
    assert stats
    for key in stats:
        assert torch.equal(trained[key], reference[key]), key
    assert any(not torch.equal(trained[n], reference[n]) for n in groups[-1])  # the top group trained


def test_freeze_bottom_leaves_the_bottom_groups_bit_identical_while_the_rest_trains(tmp_path, data, pretrained):
    """--freeze-bottom 2: after the warm-up and a fine-tuning epoch the stem and the first block
    (parameters and BatchNorm statistics) keep their pretrained values; the groups above train."""
    reference, arch, groups = pretrained
    cfg = TrainConfig.from_dict({"data": str(data), "epochs": 2, "freeze_bottom": 2,
                                 "run_dir": str(tmp_path / "run"), **TINY})
    ctx = setup_run(cfg)
    fit(ctx)
    trained = ctx.model.state_dict()  # the weights after the last epoch, not the best-epoch copy
    assert len(metric_rows(ctx.run_dir)) == 2
    frozen_params = [n for g in groups[:2] for n in g]
    frozen_modules = {n.rpartition(".")[0] for n in frozen_params}
    stats = [k for k in reference
             if k.rpartition(".")[0] in frozen_modules and k.rpartition(".")[2] in ("running_mean", "running_var")]
    assert frozen_params and stats
    for key in frozen_params + stats:
        assert torch.equal(trained[key], reference[key]), key
    for group in groups[2:]:  # every group above trains
        assert any(not torch.equal(trained[n], reference[n]) for n in group), group[0]


def test_warmup_only_finetune_leaves_body_untouched(tmp_path, data, pretrained):
    reference, arch, _ = pretrained
    run = visiontune.train(data, epochs=1, freeze_epochs=1, run_dir=tmp_path / "run", **TINY)
    check_run_consistency(run, data, 1)
    saved = load_file(str(run.model_dir / "model.safetensors"))
    head = arch.classifier + "."
    assert all(torch.equal(saved[k], v) for k, v in reference.items() if not k.startswith(head))
    assert any(not torch.equal(saved[k], v) for k, v in reference.items() if k.startswith(head))


def test_bn_stats_frozen_keeps_pretrained_statistics_while_weights_train(tmp_path, data, pretrained):
    reference, _, _ = pretrained
    cfg = TrainConfig.from_dict({"data": str(data), "epochs": 1, "freeze_epochs": 0, "bn_stats": "frozen",
                                 "run_dir": str(tmp_path / "run"), **TINY})
    ctx = setup_run(cfg)
    fit(ctx)
    trained = ctx.model.state_dict()
    stats = [k for k in reference if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(trained[k], reference[k]) for k in stats)
    convs = [k for k in reference if k.endswith("conv_stem.weight") or k.endswith("conv_pw.weight")]
    assert any(not torch.equal(trained[k], reference[k]) for k in convs)


# --- option matrix -----------------------------------------------------------------------------


# Independent options share a run (each option stays exercised, 6 runs instead of 10). The
# linear-probe "auto" head's run is test_strategies[linear-probe-auto], the same configuration.
OPTION_CASES = {
    "tensorboard-letterbox-strong-from-disk-balance-f1": {
        "logger": "tensorboard", "resize_mode": "letterbox", "augment": "strong",
        "cache_images": False, "balance": "weights", "select_metric": "macro_f1"},
    "squash-light-sgd-step-warmup-early-stopping": {
        "resize_mode": "squash", "augment": "light", "optimizer": "sgd", "schedule": "step", "step_size": 1,
        "warmup_epochs": 0.5, "epochs": 4, "early_stopping": 1, "freeze_epochs": 0},
    "probe-views-logistic": {"strategy": "linear-probe", "head": "logistic", "cached_views": 2},
    "probe-views-linear": {"strategy": "linear-probe", "cached_views": 2},
    "in-memory-crop-flip-ema-mixup-tta": {"cache_images": True, "augment": "crop-flip", "ema": True, "mixup": 0.2,
                                          "cutmix": 1.0, "freeze_epochs": 0, "tta": "flip-zoom"},
    "torchvision-scratch": {"model": "torchvision:resnet18", "strategy": "scratch", "epochs": 1},
}


@pytest.mark.parametrize("options", list(OPTION_CASES.values()), ids=list(OPTION_CASES))
def test_option_matrix_runs_are_consistent(tmp_path, data, options, capsys):
    settings = {"epochs": 2, **TINY, **options}
    run = visiontune.train(data, run_dir=tmp_path / "run", **settings)
    if options.get("cache_images"):
        assert "images in memory" in capsys.readouterr().out
    if options.get("tta"):
        assert json.loads((run.model_dir / "model.json").read_text())["inference"]["tta"] == options["tta"]
    rows, _ = check_run_consistency(run, data, settings["epochs"])
    if options.get("head") in ("logistic", "svm", "auto"):
        assert len(rows) == 1
    elif "early_stopping" not in options:
        assert len(rows) == settings["epochs"]
    saved = TrainConfig.load(run.run_dir / "config.yaml")
    for key, value in options.items():
        assert saved.get(key) == value
    if options.get("logger") == "tensorboard":
        assert list((run.run_dir / "logs").rglob("events.out.tfevents.*"))


# --- multi-label mixup ------------------------------------------------------------------------------


def test_multi_label_mixup_mixes_multi_hot_targets_by_one_lambda():
    from visiontune.training.module import ClassifierModule
    from visiontune.training.optim import OptimizerSettings, ScheduleSettings

    module = ClassifierModule(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)), "1", [], [],
                              OptimizerSettings(), ScheduleSettings(), mixup=(0.4, 0.0), task="multi")
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    _, soft = module.mixup_fn(torch.rand(4, 3, 2, 2), y)
    lam = 1 - float(soft[0, 1])  # row 0 = lam * y[0] + (1 - lam) * y[3], and only y[3] has label 1
    assert torch.allclose(soft, lam * y + (1 - lam) * y.flip(0))


@pytest.mark.slow  # covered fast by test_multi_label_mixup_mixes_multi_hot_targets_by_one_lambda (the mixing)
@pytest.mark.timeout(300)  # and the option matrix's in-memory-crop-flip-ema-mixup-tta run (mixup in Lightning)
def test_mixup_trains_multi_label(ml_data, tmp_path):
    options = {"mixup": 0.4, "cutmix": 1.0}
    run = visiontune.train(ml_data, run_dir=str(tmp_path / "run"), epochs=2, freeze_epochs=0,
                           **{**FAST, "batch_size": 4, **options})
    assert all(TrainConfig.load(run.run_dir / "config.yaml").get(k) == v for k, v in options.items())
    assert 0.0 <= run.metrics["val"]["macro_map"] <= 1.0 and Classifier.load(run.run_dir).task.name == "multi"


def test_max_steps_ends_in_a_validated_partial_epoch_where_the_schedule_ends(data, tmp_path):
    """--max-steps (a time budget's partial last epoch): the fit stops after that many optimizer
    steps, still validates the partial epoch (its metrics row, eligible as the best), and the
    cosine schedule reaches its end there rather than at the end of --epochs."""
    run = visiontune.train(data, run_dir=tmp_path / "run", epochs=3, freeze_epochs=0, max_steps=6,
                           **{**TINY, "batch_size": 8})  # 30 images: 4 steps per epoch
    rows = list(csv.DictReader(open(run.run_dir / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and rows[-1]["val_accuracy"] != ""
    newest = max((run.run_dir / "checkpoints").glob("epoch*.ckpt"), key=lambda p: p.stat().st_mtime)
    state = torch.load(newest, map_location="cpu", weights_only=True)
    assert state["global_step"] == 6
    scheduler = state["lr_schedulers"][0]
    assert scheduler["last_epoch"] == 6 and math.isclose(scheduler["_last_lr"][0] / scheduler["base_lrs"][0],
                                                         MIN_LR_FACTOR, rel_tol=1e-6)
    visiontune.train(resume=str(run.run_dir))  # a run that ended at --max-steps is finished: nothing more trains
    assert list(csv.DictReader(open(run.run_dir / "metrics.csv"))) == rows
