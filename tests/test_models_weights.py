"""Model factory and weight-file details beyond test_models.py: what exactly gets loaded, checkpoint
shapes users have on disk, code-execution payloads of several kinds, and artifact resolution."""

from __future__ import annotations

import builtins
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from visiontune.models import ArtifactError, ModelError, WeightsError, build_model, load_model, read_state_dict, save_model


def logits_of(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def test_embedded_body_is_the_same_pretrained_network_whatever_the_head():
    three, arch, _ = build_model("efficientnet_lite0", num_classes=3)
    seven, _, _ = build_model("efficientnet_lite0", num_classes=7)
    other = seven.state_dict()
    body = {k: v for k, v in three.state_dict().items() if not k.startswith(arch.head + ".")}
    assert body and all(torch.equal(v, other[k]) for k, v in body.items())
    # pretrained BatchNorm statistics, not the fresh mean 0 / var 1
    assert not all(torch.equal(v, torch.ones_like(v)) for k, v in body.items() if k.endswith("running_var"))
    head = three.get_submodule(arch.head)
    assert head.weight.abs().max() < 0.1 and torch.count_nonzero(head.bias) == 0  # small fresh head
    out = logits_of(three, torch.randn(2, 3, 32, 32))
    assert out.abs().max() < 5  # a new head starts near uniform, not with logits in the tens


def test_timm_alias_and_prefix_build_the_same_architecture():
    _, arch_a, _ = build_model("efficientnet_lite0", 2, weights="none")
    _, arch_b, _ = build_model("timm:tf_efficientnet_lite0", 2, weights="none")
    assert arch_a.name == arch_b.name == "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def resnet18_file_state():
    """A timm resnet18 state dict with distinctive values, standing in for a user's file."""
    import timm

    torch.manual_seed(1234)
    model = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    with torch.no_grad():
        model.layer4[1].bn2.running_var.uniform_(0.5, 2.0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_body_from(model, source, head):
    state = model.state_dict()
    for key in ("conv1.weight", "layer3.0.conv2.weight", "layer4.1.bn2.running_var", "layer4.1.bn2.weight"):
        assert torch.equal(state[key], source[key]), key
    assert state[f"{head}.weight"].shape[0] == 3


@pytest.mark.parametrize("layout", ["lightning-checkpoint", "dataparallel", "model_state_dict"])
def test_wrapped_state_dicts_are_unwrapped(tmp_path, resnet18_file_state, layout):
    if layout == "lightning-checkpoint":
        obj = {"epoch": 3, "global_step": 10, "state_dict": {f"model.{k}": v for k, v in resnet18_file_state.items()}}
    elif layout == "dataparallel":
        obj = {f"module.{k}": v for k, v in resnet18_file_state.items()}
    else:
        obj = {"model_state_dict": dict(resnet18_file_state), "optimizer_state_dict": {"state": {}}}
    path = tmp_path / f"{layout}.pth"
    torch.save(obj, path)
    model, arch, _ = build_model("resnet18", num_classes=3, weights=str(path))
    _assert_body_from(model, resnet18_file_state, arch.head)


def test_torchvision_model_from_local_file(tmp_path):
    import torchvision

    torch.manual_seed(99)
    source = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "tv resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.items()}, str(path))
    model, arch, _ = build_model("torchvision:resnet18", num_classes=3, weights=str(path))
    _assert_body_from(model, source, arch.head)


def test_same_family_other_depth_is_a_mismatch(tmp_path, resnet18_file_state):
    path = tmp_path / "resnet18.safetensors"
    save_file(resnet18_file_state, str(path))
    with pytest.raises(WeightsError, match="do not fit"):
        build_model("resnet34", num_classes=3, weights=str(path))


def test_unreadable_weight_files(tmp_path):
    cases = {"bad.safetensors": b"garbage" * 10, "bad.pth": b"garbage" * 10, "empty.pt": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(WeightsError):
            read_state_dict(tmp_path / name)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="state dict"):
        read_state_dict(tmp_path / "list.pth")


class _ShellPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _OpenPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


class _ExecPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_ShellPayload, _OpenPayload, _ExecPayload])
@pytest.mark.parametrize("container", ["torch.save", "raw-pickle"])
def test_code_execution_payloads_never_run(tmp_path, payload, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.pth"
    obj = {"conv1.weight": torch.zeros(1), "bn1.weight": torch.ones(1), "evil": payload(marker)}
    if container == "torch.save":
        torch.save(obj, path)  # zip format, as a real checkpoint
    else:
        with open(path, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)
    with pytest.raises(WeightsError, match="refused"):
        read_state_dict(path)
    with pytest.raises(WeightsError):
        build_model("resnet18", num_classes=3, weights=str(path))
    assert not marker.exists()


def test_artifact_found_from_run_dir_and_model_json(tmp_path):
    model, arch, pre = build_model("torchvision:resnet18", num_classes=2, weights="none")
    model_dir = tmp_path / "run dir" / "model"
    save_model(model_dir, model, {"architecture": arch.to_dict(), "class_names": ["x", "y"], "preprocessing": pre})
    x = torch.randn(2, 3, 32, 32)
    expected = logits_of(model, x)
    for where in (model_dir, model_dir.parent, model_dir / "model.json", model_dir / "model.safetensors"):
        loaded, meta = load_model(where)
        assert not loaded.training
        assert torch.equal(logits_of(loaded, x), expected)
        assert meta["class_names"] == ["x", "y"]
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.json", "model.safetensors"]


def test_saving_again_replaces_atomically(tmp_path):
    model, arch, pre = build_model("resnet18", num_classes=2, weights="none")
    meta = {"architecture": arch.to_dict(), "class_names": ["x", "y"], "preprocessing": pre}
    save_model(tmp_path, model, meta)
    with torch.no_grad():
        model.fc.bias.fill_(3.0)
    save_model(tmp_path, model, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]  # no temp files left
    loaded, _ = load_model(tmp_path)
    assert torch.equal(loaded.fc.bias, torch.full((2,), 3.0))


def test_load_model_errors(tmp_path):
    with pytest.raises(ArtifactError, match="no visiontune model"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ArtifactError, match="JSON"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text('{"format": "something-else"}')
    with pytest.raises(ArtifactError):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text('{"format": "visiontune-model", "class_names": ["a"]}')
    with pytest.raises(ArtifactError, match="architecture"):
        load_model(tmp_path)


def test_zero_classes_refused():
    with pytest.raises(ModelError):
        build_model("resnet18", num_classes=0, weights="none")
