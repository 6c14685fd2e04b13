"""Every registered strategy (and head) passes one shared end-to-end test on generated images; the
linear probe's gradient head trains through the same loop (EMA, early stopping, step checkpoints);
an option a strategy or head cannot honour is refused by name before the run dir exists."""

from __future__ import annotations

import csv

import pytest
import torch
import yaml
from conftest import CLASSES, FAST, FAST_FLAGS, make_folder, vt_main

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
def test_strategy_end_to_end(image_folder, tmp_path, capsys, strategy, head):
    epochs = 1 if head != "linear" else 2
    run = visiontune.train(image_folder, strategy=strategy, head=head, epochs=epochs, run_dir=str(tmp_path / "run"),
                           **FAST)
    assert "\nlevers: none\n" in capsys.readouterr().out  # the header names the levers in effect: none here
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
    for auto, exact in zip(rows, rows32):  # bf16 (auto, on a GPU) may flip a near-tie, and nothing else
        top = sorted((t["probability"] for t in exact["top_k"]), reverse=True)
        assert auto["label"] == exact["label"] or top[0] - top[1] < 0.01, (auto, exact)
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


def test_linear_probe_trains_in_the_loop_with_ema_early_stopping_and_step_checkpoints(image_folder, tmp_path,
                                                                                       capsys):
    """--head linear trains through the Lightning loop: each lever is applied, and visibly so."""
    epochs, patience = 8, 1
    run = visiontune.train(image_folder, strategy="linear-probe", epochs=epochs, ema=True, early_stopping=patience,
                           checkpoint_every_steps=2, run_dir=str(tmp_path / "run"), **FAST)
    out = capsys.readouterr().out
    assert "levers: EMA, early stopping (patience 1)" in out.splitlines()
    rows = list(csv.DictReader(open(run.run_dir / "metrics.csv")))
    # early stopping: the run ends at the first epoch `patience` epochs after the last improvement
    scores = [float(r["val_accuracy"]) for r in rows]
    improved = [e for e in range(1, len(scores) + 1) if scores[e - 1] > max(scores[:e - 1], default=-1.0)]
    stale = [e for e in range(1, epochs + 1) if e - max(i for i in improved if i <= e) == patience]
    expected = stale[0] if stale else epochs
    assert len(rows) == expected < epochs
    assert run.metrics["epoch"] == scores.index(max(scores)) + 1  # the saved model is the best epoch's
    ckpts = run.run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("head-epoch*.ckpt")) == [f"head-epoch{e:03d}.ckpt"
                                                                      for e in (expected - 2, expected - 1)]
    steps = sorted(ckpts.glob("head-step*.ckpt"))
    assert len(steps) == 2 and all(int(p.stem[len("head-step"):]) % 2 == 0 for p in steps)
    state = torch.load(steps[-1], map_location="cpu", weights_only=True)
    assert state["visiontune_phase"] == "head" and any("EMA" in key for key in state["callbacks"])
    assert not (run.run_dir / "lightning_logs").exists()  # every file of the head's trainer is the run's own


@pytest.mark.parametrize("args,named,remedy", [
    (["--head", "logistic", "--ema"], "--ema", "--head linear"),
    (["--head", "svm", "--early-stopping", "2"], "--early-stopping", "--head linear"),
    (["--head", "auto", "--checkpoint-every-steps", "5"], "--checkpoint-every-steps", "--head linear"),
    (["--mixup", "0.2"], "--mixup", "--strategy finetune"),
    (["--head", "logistic", "--cutmix", "1"], "--cutmix", "--strategy finetune"),
    (["--head", "linear", "--max-steps", "5"], "--max-steps", "--strategy finetune"),
], ids=["logistic-ema", "svm-early-stopping", "auto-step-checkpoints", "linear-mixup", "logistic-cutmix",
        "linear-max-steps"])
def test_a_probe_refuses_an_option_it_cannot_honour_by_name(image_folder, tmp_path, capsys, args, named, remedy):
    run_dir = tmp_path / "run"
    code, out, err = vt_main(capsys, "train", image_folder, "--strategy", "linear-probe", *args, "--run-dir",
                             run_dir, *FAST_FLAGS)
    assert code == 2 and named in err and remedy in err and f"drop {named}" in err, err
    assert not run_dir.exists() and "Traceback" not in err


def test_an_option_of_another_strategy_is_refused_by_name(image_folder, tmp_path, capsys):
    code, _, err = vt_main(capsys, "train", image_folder, "--head", "svm", "--run-dir", tmp_path / "run",
                           *FAST_FLAGS)
    assert code == 2 and "--head" in err and "--strategy linear-probe" in err
    code, _, err = vt_main(capsys, "train", image_folder, "--strategy", "scratch", "--unfreeze-every", "2",
                           "--run-dir", tmp_path / "run", *FAST_FLAGS)
    assert code == 2 and "--unfreeze-every" in err and "--strategy progressive" in err
    code, _, err = vt_main(capsys, "train", image_folder, "--strategy", "progressive", "--freeze-bottom", "2",
                           "--run-dir", tmp_path / "run", *FAST_FLAGS)
    assert code == 2 and "--freeze-bottom" in err and "--strategy finetune" in err
    # progressive unfreezes after DDP has wrapped the network: one process only
    code, _, err = vt_main(capsys, "train", image_folder, "--strategy", "progressive", "--devices", "2",
                           "--run-dir", tmp_path / "run", *FAST_FLAGS)
    assert code == 2 and "--devices" in err and "--strategy finetune" in err and "Traceback" not in err, err
    # a network built for small images has no pretrained layers to keep: it trains from scratch
    code, _, err = vt_main(capsys, "train", image_folder, "--model", "lowres_cnn", "--freeze-bottom", "2",
                           "--run-dir", tmp_path / "run", *FAST_FLAGS)
    assert code == 2 and "--freeze-bottom" in err and "scratch" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_freeze_bottom_that_leaves_nothing_to_train_is_refused_with_the_remedy(image_folder, tmp_path, capsys):
    code, _, err = vt_main(capsys, "train", image_folder, "--freeze-bottom", "99", "--run-dir", tmp_path / "run",
                           *FAST_FLAGS)
    assert code == 2 and "--freeze-bottom 99" in err and "give at most" in err and "linear-probe" in err, err
    assert not (tmp_path / "run").exists() and "Traceback" not in err


def test_a_refusal_names_what_a_time_budget_chose():
    """--time may plan a linear probe with --head auto for a small data set: an option that head
    cannot honour is refused naming the plan's choice, and how to choose otherwise."""
    from visiontune.core.errors import ConfigError
    from visiontune.training.config import TrainConfig
    from visiontune.training.levers import check_options, levers_line

    given = TrainConfig.from_dict({"data": "photos", "ema": True, "time": "5m"})
    check_options(given)  # the default finetune honours --ema
    planned = given.replace(strategy="linear-probe", head="auto", epochs=1)  # what Plan.apply does
    with pytest.raises(ConfigError, match=r"^--ema .*the time budget's plan chose --strategy linear-probe --head auto; "
                                          r"give --strategy or --head to choose\): use --head linear or drop --ema"):
        check_options(planned, planned=True)
    assert levers_line(planned.replace(ema=None, tta=True, balance="weights", mixup=0.0)) == \
        "levers: TTA (flip), balance weights (class-weighted fit)"


# ----------------------------------------------------------------------------- multi-label
# Only [linear-probe-logistic] is fast: the one-vs-rest scikit-learn fit is multi-label specific.
# The others are slow: each strategy and head is covered single-label by test_strategies, and the
# multi-label loss and metrics through the warm-up and Lightning by ml_run (test_predict's
# test_run_tunes_thresholds_and_predicts_label_sets); "auto" and "svm" take the same one-vs-rest path.
ML_STRATEGY_CASES = [pytest.param(s, h, marks=[] if (s, h) == ("linear-probe", "logistic") else pytest.mark.slow)
                     for s, h in [(s, "linear") for s in STRATEGIES if s != "finetune"]
                     + [("linear-probe", h) for h in PROBE_HEADS if h != "linear"]]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy,head", ML_STRATEGY_CASES)
def test_every_strategy_trains_multi_label(ml_data, tmp_path, strategy, head):
    run = visiontune.train(ml_data, strategy=strategy, head=head, epochs=2, freeze_epochs=1,
                           run_dir=str(tmp_path / "run"), **FAST)
    clf = Classifier.load(run.run_dir)
    assert clf.task.name == "multi" and len(clf.thresholds) == len(CLASSES)
    assert 0.0 <= run.metrics["val"]["macro_map"] <= 1.0
    assert set(clf.predict([next((ml_data.parent / "img").glob("*.png"))])[0]["scores"]) == set(CLASSES)


def test_the_warm_up_fits_its_head_on_a_share_of_the_training_images(image_folder, tmp_path, capsys, monkeypatch):
    """Of 30 training images the warm-up computes the features of about WARMUP_IMAGES (here 9), each
    class in its share (3 each here); their indices point into the training split (the sampler's
    class weights read them), and the run records the split it trained on, every image of it."""
    from collections import Counter

    import visiontune.training.budget as budget
    import visiontune.training.strategies as strategies

    monkeypatch.setattr(budget, "WARMUP_IMAGES", 9)
    monkeypatch.setattr(budget, "WARMUP_IMAGES_PER_CLASS", 1)
    real, seen = strategies.cached_features, []

    def spy(ctx, limit=None):
        features, seconds = real(ctx, limit)
        seen.append((list(ctx.splits.train), features))
        return features, seconds

    monkeypatch.setattr(strategies, "cached_features", spy)
    run = visiontune.train(image_folder, strategy="finetune", freeze_epochs=1, epochs=2, balance="sampler",
                           run_dir=str(tmp_path / "run"), **FAST)
    assert "(about 9 of the 30 training images, each class in its share)" in capsys.readouterr().out
    ((train, features),) = seen
    assert len(set(features.train_kept)) == 9
    assert [train[i][1] for i in features.train_kept] == features.train_y.tolist()
    assert Counter(features.train_y.tolist()) == {0: 3, 1: 3, 2: 3}
    assert len(features.val_y) == 6  # validation is the whole split
    assert visiontune.load(run.run_dir).card.training["num_train"] == 30
