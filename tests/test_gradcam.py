"""Grad-CAM (evaluation/gradcam.py): overlays for a trained run, and the target layer of timm and
torchvision models."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


def test_gradcam_explain_writes_overlays(trained_run, tmp_path):
    import visiontune
    from visiontune.evaluation.gradcam import explain

    run, data = trained_run
    clf = visiontune.load(run.run_dir)
    paths = sorted(str(p) for p in data.rglob("*.png"))[:3] + [str(tmp_path / "missing.png")]
    written = explain(clf, paths, tmp_path / "cam")
    assert len(written) == 3 and all(p.name.endswith(".gradcam.png") for p in written)
    pre = clf.preprocessing
    assert Image.open(written[0]).size == (pre.width, pre.height)
    assert len(np.unique(np.asarray(Image.open(written[0])).reshape(-1, 3), axis=0)) > 10


@pytest.mark.parametrize("name,layer", [("torchvision:resnet18", "layer4"), ("resnet18", "layer4"),
                                        ("efficientnet_lite0", "bn2")])
def test_gradcam_target_layer_for_timm_and_torchvision(name, layer, tmp_path):
    from visiontune.evaluation.gradcam import explain, find_target_layer
    from visiontune.inference.classifier import Classifier
    from visiontune.inference.runners import TorchRunner
    from visiontune.models.card import ModelCard
    from visiontune.models.factory import build_model

    model, arch, pre = build_model(name, 3, weights="default" if name == "efficientnet_lite0" else "none")
    assert find_target_layer(model, pre.input_size)[0] == layer
    if name.startswith("torchvision"):
        clf = Classifier(TorchRunner(model, "32"), ModelCard(["a", "b", "c"], pre.with_size(64), arch))
        Image.new("RGB", (80, 60), (200, 30, 30)).save(tmp_path / "x.png")
        assert len(explain(clf, [str(tmp_path / "x.png")], tmp_path)) == 1
