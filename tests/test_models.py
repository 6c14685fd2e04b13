"""Models by name, local weight files (safely), and model cards + artifacts: validated on load,
reloading to identical logits, refusing what does not fit before allocating it."""

from __future__ import annotations

import builtins
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from visiontune.core.errors import ArtifactError, ModelError, WeightsError
from visiontune.models.artifact import load_model, save_model
from visiontune.models.card import ModelCard
from visiontune.models.factory import build_model
from visiontune.models.weights import read_state_dict


def card_for(arch, pre, names) -> ModelCard:
    return ModelCard(class_names=list(names), preprocessing=pre, architecture=arch)


def logits_of(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def test_embedded_default_offline():
    model, arch, pre = build_model("efficientnet_lite0", 4)
    assert arch.name == "tf_efficientnet_lite0" and model.get_submodule(arch.classifier).out_features == 4
    assert pre.mean == (0.5,) * 3 and pre.std == (0.5,) * 3
    assert pre.interpolation == "bicubic" and pre.crop_pct == 0.875 and pre.input_size == (3, 224, 224)
    fresh, _, _ = build_model("efficientnet_lite0", 4, weights="none")
    assert not torch.equal(model.conv_stem.weight, fresh.conv_stem.weight)  # pretrained weights loaded


@pytest.mark.parametrize("name,side", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_larger_embedded_networks_load_offline(name, side):
    """Lite1 and Lite2 ship their ImageNet weights like Lite0: no download, the whole body loaded."""
    from visiontune.models.factory import EMBEDDED_ALIASES, _embedded_state_dict, source_classifier

    model, arch, pre = build_model(name, 4)
    assert arch.name == "tf_" + name and pre.input_size == (3, side, side) and pre.mean == (0.5,) * 3
    fresh, _, _ = build_model(name, 4, weights="none")
    assert not torch.equal(model.conv_stem.weight, fresh.conv_stem.weight)
    file_tensors = sorted(tuple(t.shape) for t in _embedded_state_dict(EMBEDDED_ALIASES[name]).values()
                          if t.dim() > 1)
    body = sorted(tuple(p.shape) for n, p in model.named_parameters() if p.dim() > 1 and not n.startswith("classifier"))
    assert all(shape in file_tensors for shape in body)  # every body weight has its pretrained tensor
    weight, bias = source_classifier(name, "default", model.num_features)
    assert weight.shape == (1000, model.num_features) and bias.shape == (1000,)


@pytest.mark.parametrize("name,head", [("resnet18", "fc"), ("torchvision:resnet18", "fc"),
                                       ("torchvision:mobilenet_v3_small", "classifier.3")])
def test_other_models_random_init(name, head):
    model, arch, pre = build_model(name, 3, weights="none")
    assert arch.classifier == head
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    assert len(pre.mean) == 3


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
    save_model(tmp_path / "m", model, card_for(arch, pre, ["a", "b", "c"]))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "model.json", "model.safetensors"]
    loaded, card = load_model(tmp_path / "m")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert card.class_names == ["a", "b", "c"] and "torch" in card.versions and card.created


def test_embedded_body_is_the_same_pretrained_network_whatever_the_head():
    three, arch, _ = build_model("efficientnet_lite0", num_classes=3)
    seven, _, _ = build_model("efficientnet_lite0", num_classes=7)
    other = seven.state_dict()
    body = {k: v for k, v in three.state_dict().items() if not k.startswith(arch.classifier + ".")}
    assert body and all(torch.equal(v, other[k]) for k, v in body.items())
    # pretrained BatchNorm statistics, not the fresh mean 0 / var 1
    assert not all(torch.equal(v, torch.ones_like(v)) for k, v in body.items() if k.endswith("running_var"))
    head = three.get_submodule(arch.classifier)
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
    _assert_body_from(model, resnet18_file_state, arch.classifier)


def test_torchvision_model_from_local_file(tmp_path):
    import torchvision

    torch.manual_seed(99)
    source = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "tv resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.items()}, str(path))
    model, arch, _ = build_model("torchvision:resnet18", num_classes=3, weights=str(path))
    _assert_body_from(model, source, arch.classifier)


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
    save_model(model_dir, model, card_for(arch, pre, ["x", "y"]))
    x = torch.randn(2, 3, 32, 32)
    expected = logits_of(model, x)
    for where in (model_dir, model_dir.parent, model_dir / "model.json", model_dir / "model.safetensors"):
        loaded, card = load_model(where)
        assert not loaded.training
        assert torch.equal(logits_of(loaded, x), expected)
        assert card.class_names == ["x", "y"] and card.model_dir == model_dir
    assert sorted(p.name for p in model_dir.iterdir()) == ["README.md", "model.json", "model.safetensors"]


def test_saving_again_replaces_atomically(tmp_path):
    model, arch, pre = build_model("resnet18", num_classes=2, weights="none")
    card = card_for(arch, pre, ["x", "y"])
    save_model(tmp_path, model, card)
    with torch.no_grad():
        model.fc.bias.fill_(3.0)
    save_model(tmp_path, model, card)
    # no temp files left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "model.json", "model.safetensors"]
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


# ----------------------------------------------------------------------------- untrusted cards
@pytest.fixture()
def saved_resnet(tmp_path):
    model, arch, pre = build_model("resnet18", num_classes=2, weights="none")
    save_model(tmp_path / "m", model, card_for(arch, pre, ["ant", "bee"]))
    return tmp_path / "m"


def _edit_card(model_dir, change):
    path = model_dir / "model.json"
    values = json.loads(path.read_text())
    change(values)
    path.write_text(json.dumps(values))


@pytest.mark.parametrize("change,needle", [
    (lambda v: v["architecture"].update(num_classes=3_000_000), "num_classes"),
    (lambda v: v["architecture"].update(num_classes=3) or v.update(class_names=["a", "b", "c"]), "2-class classifier"),
    (lambda v: v.update(class_names=["ant", "bee", "wasp"]), "class_names lists 3"),
    (lambda v: v.update(class_names=["ant", "be\x1be"]), "control or invisible character"),
    (lambda v: v.update(class_names=["ant", "ant"]), "twice"),
    (lambda v: v.update(class_names=["ant", "x" * 500]), "class name"),
    (lambda v: v["preprocessing"].update(crop_pct=0.001), "crop_pct"),
    (lambda v: v["preprocessing"].update(input_size=[3, 100000, 100000]), "input_size"),
    (lambda v: v["preprocessing"].update(std=[0, 0, 0]), "std"),
    (lambda v: v["preprocessing"].update(interpolation="magic"), "interpolation"),
    (lambda v: v.update(calibration={"temperature": float("nan")}), "temperature"),
    (lambda v: v.update(calibration={"temperature": 0.0}), "temperature"),
    (lambda v: v.update(surprise=1), "unknown key"),
    (lambda v: v["architecture"].update(source="pickle"), "source"),
])
def test_crafted_cards_are_refused_naming_the_field(saved_resnet, change, needle):
    _edit_card(saved_resnet, change)
    with pytest.raises(ArtifactError, match=needle):
        load_model(saved_resnet)


def test_pruned_shapes_may_only_shrink_known_layers(saved_resnet):
    _edit_card(saved_resnet, lambda v: v.update(pruned={"shapes": {"fc": {"in_features": 10**7}}}))
    with pytest.raises(ArtifactError, match="does not fit"):
        load_model(saved_resnet)
    _edit_card(saved_resnet, lambda v: v.update(pruned={"shapes": {"os.system": {"in_features": 1}}}))
    with pytest.raises(ArtifactError, match="not a prunable layer"):
        load_model(saved_resnet)


def test_weights_that_do_not_fit_the_card_are_a_clear_error(saved_resnet, tmp_path):
    other, arch, pre = build_model("resnet34", num_classes=2, weights="none")
    save_model(tmp_path / "other", other, card_for(arch, pre, ["ant", "bee"]))
    (saved_resnet / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(ArtifactError, match="does not fit"):
        load_model(saved_resnet)


def test_old_cards_with_head_instead_of_classifier_still_load(saved_resnet):
    def rename(v):
        v["architecture"]["head"] = v["architecture"].pop("classifier")
    _edit_card(saved_resnet, rename)
    _, card = load_model(saved_resnet)
    assert card.architecture.classifier == "fc"


def test_source_classifier_pairs_weight_and_bias_by_name(tmp_path):
    """safetensors lists keys sorted (bias before weight): the pretrained head is still found."""
    from visiontune.models.factory import source_classifier

    head_w, head_b = torch.randn(5, 8), torch.randn(5)
    path = tmp_path / "weights.safetensors"
    save_file({"body.weight": torch.randn(8, 3, 1, 1), "fc.weight": head_w, "fc.bias": head_b,
               "other.bias": torch.randn(8)}, str(path))
    w, b = source_classifier("resnet18", str(path), 8)
    assert torch.equal(w, head_w) and torch.equal(b, head_b)
    assert source_classifier("resnet18", str(path), 16) is None  # no [C, 16] matrix in the file


def test_card_validates_task_and_thresholds():
    base = {"format": "visiontune-model", "class_names": ["a", "b"],
            "architecture": {"source": "timm", "name": "resnet18", "num_classes": 2, "classifier": "fc"},
            "preprocessing": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}}
    card = ModelCard.from_dict({**base, "inference": {"task": "multi", "thresholds": [0.3, 0.7]}})
    assert card.task.name == "multi" and card.thresholds == [0.3, 0.7]
    assert ModelCard.from_dict(card.to_dict()).thresholds == [0.3, 0.7]
    assert ModelCard.from_dict({**base, "inference": {"task": "multi"}}).thresholds == [0.5, 0.5]
    for bad in ({"task": "multi", "thresholds": [0.3]}, {"task": "multi", "thresholds": [0.3, 1.5]},
                {"task": "multi", "thresholds": [0.3, "x"]}, {"thresholds": [0.3, 0.7]}, {"task": "many"}):
        with pytest.raises(ArtifactError):
            ModelCard.from_dict({**base, "inference": bad})


def test_a_card_naming_millions_of_classes_is_refused_before_any_allocation():
    from visiontune.models.card import ModelCard
    from visiontune.models.factory import MAX_CLASSES

    with pytest.raises(ArtifactError, match="classes"):
        ModelCard.from_dict({"format": "visiontune-model", "class_names": [f"c{i}" for i in range(MAX_CLASSES + 1)],
                             "preprocessing": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}},
                            require_architecture=False)


def test_bottom_parameter_names_are_the_bottom_groups_stem_first():
    from visiontune.core.errors import ConfigError
    from visiontune.models.groups import body_groups, bottom_parameter_names

    model, arch, _ = build_model("efficientnet_lite0", num_classes=3, weights="none")
    groups = body_groups(model, arch.classifier)
    assert bottom_parameter_names(model, arch.classifier, 0) == []
    two = bottom_parameter_names(model, arch.classifier, 2)
    assert two == groups[0] + groups[1] and two[0].startswith("conv_stem")
    assert not any(n.startswith(arch.classifier) for n in bottom_parameter_names(model, arch.classifier,
                                                                                  len(groups) - 1))
    with pytest.raises(ConfigError, match=f"give at most {len(groups) - 1}"):
        bottom_parameter_names(model, arch.classifier, len(groups))
