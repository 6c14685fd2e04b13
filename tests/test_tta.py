"""Test-time augmentation: the views (models/tta.py), flip-zoom alike on every surface, and
``--tta auto``'s measured choice (training/tta_choice.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import reference_probabilities, vt_main
from torch import nn

from visiontune.core.errors import ConfigError
from visiontune.inference.classifier import Classifier
from visiontune.inference.runners import forward_logits
from visiontune.models.tta import TTA_MODES, tta_mode, view, view_cost, views, zoomed_size
from visiontune.training.tta_choice import TTA_MIN_GAIN, choose, final_tta, validation_tta


def test_views_of_each_mode():
    x = torch.rand(2, 3, 96, 64)
    assert [v.shape for v in views(x, "")] == [x.shape]
    plain, mirror = views(x, "flip")
    assert torch.equal(plain, x) and torch.equal(mirror, x.flip(-1))
    plain, zoomed = views(x, "flip-zoom")
    assert zoomed.shape[-2:] == zoomed_size(96, 64) == (128, 96)  # whole steps of 32 px: strides keep parity
    # the second view is the enlarged image mirrored: enlarging the mirror image gives the same pixels
    enlarged = nn.functional.interpolate(x.flip(-1), size=(128, 96), mode="bilinear", align_corners=False)
    torch.testing.assert_close(zoomed, enlarged)
    assert view_cost("") == 1 < view_cost("flip") == 2 < view_cost("flip-zoom", 224) < view_cost("flip-zoom", 96) < 3


def test_an_unknown_mode_is_refused_naming_the_modes():
    assert (tta_mode(True), tta_mode(False), tta_mode(None), tta_mode("none")) == ("flip", "", "", "")
    with pytest.raises(ConfigError, match="flip-zoom"):
        tta_mode("zoom")
    assert TTA_MODES.names() == ("none", "flip", "flip-zoom")


def test_forward_logits_average_the_views():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        expected = (model(x) + model(view(x, "flip-zoom", 1))) / 2
        torch.testing.assert_close(forward_logits(model, x, "flip-zoom"), expected)
        torch.testing.assert_close(forward_logits(model, x, True), (model(x) + model(x.flip(-1))) / 2)
        torch.testing.assert_close(forward_logits(model, x, None), model(x))


@pytest.fixture(scope="module")
def zoom_model(tiny_model, tmp_path_factory):
    """``tiny_model`` with ``inference.tta`` flip-zoom in its card (what ``--tta auto`` writes)."""
    run = tmp_path_factory.mktemp("zoom") / "run"
    shutil.copytree(tiny_model[0], run)
    card_file = run / "model" / "model.json"
    card = json.loads(card_file.read_text())
    card["inference"] = {**(card.get("inference") or {}), "tta": "flip-zoom"}
    card_file.write_text(json.dumps(card))
    return run, tiny_model[1]


def test_flip_zoom_predicts_alike_in_python_the_reference_and_onnx(zoom_model, tmp_path):
    from visiontune.export.exporter import export_model

    run, data = zoom_model
    files = sorted(str(p) for p in data.rglob("*.jpg"))
    clf = Classifier.load(run, precision="32")
    assert clf.card.tta == "flip-zoom"
    probs = torch.tensor([[t["probability"] for t in sorted(r["top_k"], key=lambda t: t["label"])]
                          for r in clf.predict(files, top_k=3)])
    expected, _ = reference_probabilities(run / "model", files)  # written out independently in conftest
    torch.testing.assert_close(probs, expected.float(), atol=1e-4, rtol=0)
    plain = Classifier.load(run, precision="32", tta="none")
    assert not torch.allclose(plain.logits_of(files)[0], clf.logits_of(files)[0])  # the views do count

    report = export_model(run, "onnx", out=tmp_path / "onnx" / "model.onnx")
    assert report["passed"] and report["top1_agreement"] == 1.0
    onnx = Classifier.load(report["file"])
    assert onnx.card.tta == "flip-zoom"
    np.testing.assert_allclose(onnx.logits_of(files)[0].numpy(), clf.logits_of(files)[0].numpy(), atol=1e-3)
    with pytest.raises(ConfigError, match="built in \\(flip-zoom\\)"):
        Classifier.load(report["file"], tta="flip")
    (Path(report["file"]).parent / "model.json").unlink()  # the graph's own metadata names its views
    assert Classifier.load(report["file"]).card.tta == "flip-zoom"


@pytest.mark.parametrize("fmt", ["openvino", "torchscript"])
def test_the_other_graphs_carry_flip_zoom(zoom_model, tmp_path, fmt):
    from visiontune.export.exporter import export_model
    from visiontune.export.registry import EXPORT_FORMATS

    report = export_model(zoom_model[0], fmt, out=tmp_path / fmt / EXPORT_FORMATS.get(fmt).file_name)
    assert report["passed"] and report["top1_agreement"] == 1.0 and report["max_abs_logit_diff"] <= 1e-3


def test_hf_readme_tells_timm_users_how_to_average_the_views(zoom_model, tmp_path):
    """timm alone runs one view: the exported README's snippet, run as written, gives visiontune's logits."""
    import re

    import timm

    from visiontune.export.exporter import export_model

    run, _ = zoom_model
    export_model(run, "hf", out=tmp_path / "hf")
    text = (tmp_path / "hf" / "README.md").read_text()
    snippet = re.search(r"```python\n(import torch.nn.functional as F\nlogits = .*?)```", text, re.S)
    assert snippet and "mirror image enlarged" in text
    model = timm.create_model("local-dir:" + str(tmp_path / "hf"), pretrained=True).eval()
    x = torch.rand(3, 3, 64, 64)
    scope = {"model": model, "x": x}
    with torch.no_grad():
        exec(snippet.group(1), scope)  # the README's own code, nothing retyped
        expected = forward_logits(Classifier.load(run, precision="32").model.float(), x, "flip-zoom")
    torch.testing.assert_close(scope["logits"], expected, atol=1e-4, rtol=0)


def test_auto_keeps_the_second_view_only_where_it_gains():
    y = torch.tensor([0, 1] * 500)
    plain = torch.nn.functional.one_hot(y, 2).float()
    plain[:10] = plain[:10].flip(1)  # 10 of 1,000 wrong
    fixed = plain.clone()
    fixed[:10] = fixed[:10].flip(1) * 3  # the second view puts them right, confidently
    kept = choose(plain, fixed, y, side=64)
    assert kept.mode == "flip-zoom" and (kept.plain, kept.accuracy) == pytest.approx((0.99, 1.0))
    one_more = plain.clone()
    one_more[0] = one_more[0].flip(0) * 3  # a gain of 0.1%, under the threshold
    dropped = choose(plain, one_more, y, side=64)
    assert dropped.mode == "" and dropped.accuracy == dropped.plain == pytest.approx(0.99)
    assert 0 < dropped.gain < TTA_MIN_GAIN
    assert "one view kept" in dropped.line() and "flip-zoom kept" in kept.line()
    assert (validation_tta("auto"), final_tta("auto"), final_tta("flip"), final_tta(None)) == ("", "flip-zoom",
                                                                                              "flip", "")


def test_train_with_tta_auto_records_its_measurement_and_predicts_as_chosen(shared_folder, tmp_path, capsys):
    run_dir = tmp_path / "auto run"
    code, out, err = vt_main(capsys, "train", shared_folder, "--epochs", "1", "--tta", "auto", "--run-dir", run_dir,
                             "--img-size", "32", "--batch-size", "8", "--workers", "0", "--no-progress", "--no-report")
    assert code == 0, err
    assert "test-time augmentation (auto): flip-zoom" in out
    card = json.loads((run_dir / "model" / "model.json").read_text())
    choice = card["training"]["tta_choice"]
    assert choice["images"] == card["training"]["num_val"] and choice["measured"] == "flip-zoom"
    assert choice["mode"] == ("flip-zoom" if choice["gain"] >= TTA_MIN_GAIN else "none")
    assert (card.get("inference") or {}).get("tta", "none") == choice["mode"]
    assert card["metrics"]["val"]["accuracy"] == pytest.approx(choice["accuracy"], abs=1e-4)
    files = sorted(str(p) for p in shared_folder.rglob("*.png"))[:6]
    rows = Classifier.load(run_dir, precision="32").predict(files, top_k=3)
    expected, meta = reference_probabilities(run_dir / "model", files)
    names = meta["class_names"]
    probs = torch.tensor([[next(t["probability"] for t in r["top_k"] if t["label"] == n) for n in names]
                          for r in rows])
    torch.testing.assert_close(probs, expected.float(), atol=1e-4, rtol=0)


def test_a_network_built_for_one_size_keeps_one_view(shared_folder, tmp_path, capsys):
    """A ViT's position embeddings take only its own size: flip-zoom is refused (with the remedy) where
    it is asked for, and auto plans no measurement for it."""
    from visiontune.models.factory import build_model, fit_input_size
    from visiontune.models.tta import takes_zoom

    vit, _, _ = build_model("vit_tiny_patch16_224", 2, weights="none")
    fit_input_size(vit, 64, 64)
    cnn, _, _ = build_model("resnet18", 2, weights="none")
    assert not takes_zoom(vit, 64) and takes_zoom(cnn, 64) and vit.training  # its mode is left as it was
    code, out, err = vt_main(capsys, "train", shared_folder, "--model", "vit_tiny_patch16_224", "--weights", "none",
                             "--tta", "flip-zoom", "--epochs", "1", "--img-size", "32", "--run-dir", tmp_path / "vit",
                             "--workers", "0", "--no-progress")
    assert code != 0 and "takes only the input size" in err and "--tta flip" in err and "Traceback" not in err
    from test_budget import CIFAR, facts

    from visiontune.training.budget import plan_run
    assert "tta" not in plan_run(facts(30 * 60, **CIFAR, zoom=False)).recipe


def test_a_config_of_the_on_off_flag_still_loads():
    from visiontune.training.config import TrainConfig

    assert TrainConfig.from_dict({"data": "d", "tta": True}).get("tta") == "flip"
    assert TrainConfig.from_dict({"data": "d", "tta": False}).get("tta") == "none"
