"""Models by name, local weight files (safely), artifacts that reload to identical logits."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from visiontune.models import ModelError, WeightsError, build_model, load_model, save_model


def test_embedded_default_offline():
    model, arch, pre = build_model("efficientnet_lite0", 4)
    assert arch.name == "tf_efficientnet_lite0" and model.get_submodule(arch.head).out_features == 4
    assert pre["mean"] == [0.5] * 3 and pre["std"] == [0.5] * 3
    assert pre["interpolation"] == "bicubic" and pre["crop_pct"] == 0.875 and pre["input_size"] == [3, 224, 224]
    fresh, _, _ = build_model("efficientnet_lite0", 4, weights="none")
    assert not torch.equal(model.conv_stem.weight, fresh.conv_stem.weight)  # pretrained weights loaded


@pytest.mark.parametrize("name,head", [("resnet18", "fc"), ("torchvision:resnet18", "fc"),
                                       ("torchvision:mobilenet_v3_small", "classifier.3")])
def test_other_models_random_init(name, head):
    model, arch, pre = build_model(name, 3, weights="none")
    assert arch.head == head
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    assert len(pre["mean"]) == 3


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_from_local_file(tmp_path, suffix):
    donor, _, _ = build_model("resnet18", 1000, weights="none")
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in donor.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    model, _, _ = build_model("resnet18", 5, weights=str(path))
    assert torch.equal(model.layer1[0].conv1.weight, donor.layer1[0].conv1.weight)
    assert model.fc.out_features == 5


def test_mismatched_weights_file(tmp_path):
    other, _, _ = build_model("efficientnet_lite0", 10, weights="none")
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match="do not fit"):
        build_model("resnet18", 5, weights=str(tmp_path / "w.safetensors"))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": _Exploit(marker)}, fh)
    with pytest.raises(WeightsError, match="refused"):
        build_model("resnet18", 2, weights=str(path))
    assert not marker.exists()


def test_unknown_model_and_missing_file():
    with pytest.raises(ModelError, match="unknown model"):
        build_model("resnet_does_not_exist", 2)
    with pytest.raises(ModelError, match="unknown torchvision model"):
        build_model("torchvision:nope", 2)
    with pytest.raises(WeightsError, match="not found"):
        build_model("resnet18", 2, weights="/no/such/file.pth")


def test_artifact_round_trip_identical_logits(tmp_path):
    model, arch, pre = build_model("efficientnet_lite0", 3)
    model.eval()
    save_model(tmp_path / "m", model, {"architecture": arch.to_dict(), "class_names": ["a", "b", "c"],
                                        "preprocessing": pre, "metrics": {}})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json", "model.safetensors"]
    loaded, meta = load_model(tmp_path / "m")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert meta["class_names"] == ["a", "b", "c"] and "torch" in meta["versions"]
