"""``--weights RUN|MODEL``: a trained visiontune model starts a new run on the same classes, its
network, classifier, input size and preprocessing included (a ViT at the size it was trained at);
a weights file keeps the earlier meaning; other classes, another ``--model``, a pruned model, a
folder with no model, ``--strategy scratch`` and a mismatched weights file are refused by name
before a run dir exists."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, FAST_FLAGS, make_folder, vt_main
from safetensors.torch import load_file, save_file

import visiontune
from visiontune.models.artifact import WEIGHTS_FILE, read_card, write_card
from visiontune.training.config import TrainConfig
from visiontune.training.setup import continued_side, setup_run


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    """A tiny resnet18 run (not the default network: the new run must take it from the card)."""
    base = tmp_path_factory.mktemp("resnet run")
    data = make_folder(base / "data", per_class=6)
    run = visiontune.train(data, model="resnet18", weights="none", epochs=1, freeze_epochs=0,
                           run_dir=str(base / "run"), **{**FAST, "img_size": 40})
    return run, data


def _same(state: dict, saved: dict, skip: str | None = None) -> bool:
    return all(torch.equal(state[k].float(), saved[k]) for k in saved if skip is None or not k.startswith(skip))


def test_a_trained_model_starts_the_run_with_its_classifier_size_and_network(resnet_run, tmp_path):
    run, data = resnet_run
    saved = load_file(str(run.model_dir / WEIGHTS_FILE))
    for i, weights in enumerate((run.run_dir, run.model_dir)):  # a run folder or its model folder
        cfg = TrainConfig.from_dict({"data": str(data), "weights": str(weights), "epochs": 1, "workers": 0,
                                     "progress": False, "report": False, "run_dir": str(tmp_path / f"next {i}")})
        ctx = setup_run(cfg)
        assert ctx.arch.name == "resnet18" and ctx.cfg.model.name == "resnet18"
        assert ctx.arch.classifier + ".weight" in saved and _same(ctx.model.state_dict(), saved)
        assert ctx.preprocessing.height == 40 and ctx.cfg.model.img_size == 40  # the model's own size
        assert ctx.cfg.strategy.freeze_epochs == 0
        assert {"model", "weights"} <= ctx.cfg.given and not {"strategy", "img_size"} & ctx.cfg.given  # a plan's
        assert ctx.cfg.model.weights == str(run.model_dir.resolve())  # the folder, absolute, recorded


def test_a_vit_starts_at_the_size_it_was_trained_at_and_trains_at_another(tmp_path):
    """A network whose position embeddings are built for one size loads at the model's size, then
    takes the new run's."""
    data = make_folder(tmp_path / "data", per_class=4)
    vit = {"model": "vit_tiny_patch16_224", "weights": "none", "epochs": 1, "freeze_epochs": 0, **FAST}
    first = visiontune.train(data, run_dir=str(tmp_path / "vit run"), **vit)
    second = visiontune.train(data, weights=str(first.run_dir), epochs=1, img_size=48, workers=0,
                              progress=False, report=False, run_dir=str(tmp_path / "vit again"))
    assert read_card(second.model_dir).preprocessing.height == 48
    assert read_card(second.model_dir).architecture.name == "vit_tiny_patch16_224"


def test_a_weights_file_still_starts_a_new_classifier(resnet_run, tmp_path):
    """A plain state-dict file (even a model's own weights file) keeps the earlier meaning: the body
    is loaded, the classifier starts anew."""
    run, data = resnet_run
    cfg = TrainConfig.from_dict({"data": str(data), "model": "resnet18", "weights": str(run.model_dir / WEIGHTS_FILE),
                                 "epochs": 1, "run_dir": str(tmp_path / "file run"), **FAST})
    ctx = setup_run(cfg)
    saved = load_file(str(run.model_dir / WEIGHTS_FILE))
    head = ctx.arch.classifier
    assert not torch.equal(ctx.model.state_dict()[head + ".weight"], saved[head + ".weight"])
    assert _same(ctx.model.state_dict(), saved, skip=head)


def test_what_cannot_start_a_run_is_refused_by_name(resnet_run, tmp_path, capsys):
    run, data = resnet_run
    other = make_folder(tmp_path / "other classes", per_class=3, classes={"cat": (200, 0, 0), "dog": (0, 0, 200)})
    card = read_card(run.model_dir)
    pruned, no_model, bad = tmp_path / "pruned model", tmp_path / "not a model", tmp_path / "bad weights"
    for folder in (pruned, no_model, bad):
        folder.mkdir()
    (pruned / WEIGHTS_FILE).write_bytes((run.model_dir / WEIGHTS_FILE).read_bytes())
    write_card(pruned, card.replace(pruned={"ratio": 0.2, "shapes": {}}))
    state = load_file(str(run.model_dir / WEIGHTS_FILE))
    head = card.architecture.classifier + ".weight"
    save_file({**state, head: torch.zeros(7, state[head].shape[1])}, str(bad / WEIGHTS_FILE))  # 7 classes
    write_card(bad, card)
    cases = ((other, run.run_dir, (), "same classes"),
             (data, run.run_dir, ("--model", "efficientnet_lite0"), "drop --model"),
             (data, run.run_dir, ("--strategy", "scratch"), "--strategy finetune, or drop --weights"),
             (data, pruned, (), "pruned model cannot start a run"),
             (data, no_model, (), "no visiontune model at"),
             (data, bad, (), "7-class classifier"))
    for i, (folder, weights, extra, message) in enumerate(cases):
        run_dir = tmp_path / f"refused {i}"
        code, _, err = vt_main(capsys, "train", folder, "--weights", weights, *extra, "--epochs", "1",
                               "--run-dir", run_dir, *FAST_FLAGS)
        assert code == 2 and message in err and "Traceback" not in err, (message, err)
        assert not run_dir.exists()


def test_a_probe_on_a_trained_model_fits_a_head_on_its_fine_tuned_body(resnet_run, tmp_path):
    """``--strategy linear-probe --head auto`` (the plan for small sets of photos) on a trained model:
    the cross-validated probe runs on the model's body, which it leaves as it was."""
    run, data = resnet_run
    out = visiontune.train(data, weights=str(run.run_dir), strategy="linear-probe", head="auto",
                           run_dir=str(tmp_path / "probe run"), workers=0, progress=False, report=False)
    before, after = load_file(str(run.model_dir / WEIGHTS_FILE)), load_file(str(out.model_dir / WEIGHTS_FILE))
    head = read_card(out.model_dir).architecture.classifier + "."
    body = [k for k in before if not k.startswith(head)]
    assert body and all(torch.equal(before[k], after[k]) for k in body)
    assert read_card(out.model_dir).training["strategy"] == "linear-probe"
    # a run from that probe plans as a fresh one (its body is the pretrained backbone's), one from the fine-tune
    # continues it
    assert continued_side(read_card(out.model_dir)) is None and continued_side(read_card(run.model_dir)) == 40


def test_under_a_budget_a_trained_model_continues_at_most_at_its_own_size(resnet_run, tmp_path, capsys):
    """The plan measures the model's own size and none above it (40 px here, under the 48 px a
    pretrained network is fine-tuned at: a trained model's own size is kept) and continues the
    fine-tune, as the plan's reason says."""
    run, data = resnet_run
    cfg = TrainConfig.from_dict({"data": str(data), "weights": str(run.run_dir), "time": "20m", "workers": 0,
                                 "batch_size": 8, "progress": False, "report": False,
                                 "run_dir": str(tmp_path / "continued")})
    ctx = setup_run(cfg)
    assert "measuring this machine at 40 px" in capsys.readouterr().out
    assert (ctx.plan.strategy, ctx.plan.img_size, ctx.plan.freeze_epochs) == ("finetune", 40, 0)
    assert ctx.plan.reason.startswith("a trained model continues") and ctx.preprocessing.height == 40


def test_compare_refuses_a_trained_model_as_every_entrys_start(resnet_run, tmp_path, capsys):
    run, data = resnet_run
    code, _, err = vt_main(capsys, "compare", data, "--weights", run.run_dir, "--epochs", "1",
                           "--run-dir", tmp_path / "cmp", *FAST_FLAGS)
    assert code == 2 and "visiontune train DATA --weights RUN" in err and "Traceback" not in err
    assert not (tmp_path / "cmp").exists()
