"""Training's precisions: bf16-dense computes exactly the dense layers in bf16 and nothing else, is
a training precision only (inference stays fp32), is measured side by side against fp32 by the
probe, and trains end to end; Adam and AdamW run fused."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import FAST, vt_main
from torch import nn
from torch.nn import functional as F

import visiontune
from visiontune.core.errors import ConfigError
from visiontune.core.hardware import DenseBF16, autocast, inference_precision, resolve_precision, train_autocast
from visiontune.core.registry import PRECISIONS, TRAIN_PRECISIONS
from visiontune.models.lowres import LowResCNN
from visiontune.training import budget
from visiontune.training.lightning_fit import DenseBF16Precision, trainer_precision
from visiontune.training.optim import OptimizerSettings, make_optimizer


def layers(seed: int = 0) -> tuple[nn.Conv2d, nn.Conv2d, nn.Linear]:
    torch.manual_seed(seed)
    return nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Linear(64, 2)


def bf16(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.bfloat16()


def test_dense_layers_compute_in_bf16_and_depthwise_ones_in_fp32():
    dense, depthwise, linear = layers()
    x = torch.randn(2, 3, 4, 4)
    with DenseBF16():
        a = dense(x)
        b = depthwise(a)
        c = linear(b.flatten(1))
    assert a.dtype == b.dtype == c.dtype == torch.float32  # what leaves a layer is fp32, as under autocast
    with torch.no_grad():
        assert a.equal(F.conv2d(x.bfloat16(), bf16(dense.weight), bf16(dense.bias)).float())
        assert b.equal(F.conv2d(a, depthwise.weight, depthwise.bias, padding=1, groups=4))
        assert c.equal(F.linear(b.flatten(1).bfloat16(), bf16(linear.weight), bf16(linear.bias)).float())
        assert not a.equal(dense(x))  # outside the mode the same layer computes in fp32


def test_gradients_and_weights_stay_fp32():
    dense, depthwise, linear = layers()
    with DenseBF16():
        linear(depthwise(dense(torch.randn(2, 3, 4, 4))).flatten(1)).square().mean().backward()
    for layer in (dense, depthwise, linear):
        for p in layer.parameters():
            assert p.dtype == p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0


def test_bf16_dense_is_a_training_precision_and_inference_runs_fp32():
    assert "bf16-dense" in TRAIN_PRECISIONS and "bf16-dense" not in PRECISIONS
    assert set(PRECISIONS) < set(TRAIN_PRECISIONS)
    assert resolve_precision("bf16-dense", 96, TRAIN_PRECISIONS) == "bf16-dense"
    with pytest.raises(ConfigError, match="bf16-dense"):  # loading a model for inference refuses it by name
        resolve_precision("bf16-dense", 96)
    assert inference_precision("bf16-dense") == "32"  # what features and predictions of such a run compute in
    with autocast("bf16-dense", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    assert isinstance(train_autocast("bf16-dense", "cpu"), DenseBF16)
    with train_autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")


def test_the_lightning_plugin_applies_the_mode_to_training_steps_only():
    (plugin,) = trainer_precision("bf16-dense")["plugins"]
    assert isinstance(plugin, DenseBF16Precision)
    assert trainer_precision("32") == {"precision": "32-true"}
    dense, _, _ = layers()
    x = torch.randn(1, 3, 2, 2)
    with torch.no_grad():
        fp32, half = dense(x), F.conv2d(x.bfloat16(), bf16(dense.weight), bf16(dense.bias)).float()
        with plugin.train_step_context():
            assert dense(x).equal(half)
        for context in (plugin.val_step_context, plugin.test_step_context, plugin.predict_step_context):
            with context():
                assert dense(x).equal(fp32)


def test_inference_commands_refuse_a_training_precision(capsys, tiny_model, shared_folder):
    image = next(p for p in sorted(shared_folder.rglob("*")) if p.is_file())
    code, _, err = vt_main(capsys, "predict", tiny_model[0], image, "--precision", "bf16-dense")
    assert code == 2 and "bf16-dense" in err and "choose from" in err


def test_a_run_trains_in_bf16_dense_end_to_end(image_folder, tmp_path, monkeypatch):
    in_bf16 = []
    handler = DenseBF16.__torch_function__

    def counting(self, func, types, args=(), kwargs=None):
        in_bf16.append(func in (F.conv2d, F.linear) and args[0].dtype == torch.float32)
        return handler(self, func, types, args, kwargs)

    monkeypatch.setattr(DenseBF16, "__torch_function__", counting)
    run = visiontune.train(image_folder, strategy="finetune", epochs=2, precision="bf16-dense",
                           run_dir=str(tmp_path / "run"), **FAST)
    assert any(in_bf16)  # the training steps ran their dense layers through the mode
    assert yaml.safe_load((run.run_dir / "config.yaml").read_text())["precision"] == "bf16-dense"
    assert 0.0 <= run.metrics["val"]["accuracy"] <= 1.0
    model = visiontune.load(run.run_dir)
    assert all(p.dtype == torch.float32 for p in model.model.parameters())  # the artifact is fp32
    assert len(model.predict(sorted(str(p) for p in image_folder.rglob("*.png"))[:2])) == 2


def test_the_probe_measures_bf16_dense_beside_fp32_where_fp32_is_the_faster(monkeypatch):
    monkeypatch.setattr(budget, "precisions_to_measure", lambda precision, size: ["32", "bf16", "bf16-dense"])
    quick = {"32": 100.0, "bf16": 60.0, "bf16-dense": 400.0}  # bf16-dense: the inference step (fp32)
    monkeypatch.setattr(budget, "_step_images_per_second", lambda run, batch, seconds: quick[run.precision])
    compared = []

    def side_by_side(steps, batch, seconds):
        compared.append(sorted(steps))
        return {"32": 100.0, "bf16-dense": 108.0}

    monkeypatch.setattr(budget, "side_by_side", side_by_side)
    (t,) = budget.measure_throughput(LowResCNN(2, (8, 8, 8)), [32], "auto", 4)
    assert (t.precision, t.train) == ("bf16-dense", 108.0) and compared == [["32", "bf16-dense"]]
    quick["bf16"] = 180.0  # bf16 wins the quick ranking: nothing to compare beside fp32
    (t,) = budget.measure_throughput(LowResCNN(2, (8, 8, 8)), [32], "auto", 4)
    assert (t.precision, t.train) == ("bf16", 180.0) and len(compared) == 1


def test_side_by_side_alternates_the_steps_and_counts_each():
    calls = []
    rates = budget.side_by_side({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 8, 0.0)
    assert calls == ["a", "b"] + ["a", "b"] * 2  # a warm-up of each, then alternated
    assert set(rates) == {"a", "b"} and all(r > 0 for r in rates.values())


def test_an_explicit_bf16_dense_is_measured_as_given():
    assert budget.precisions_to_measure("bf16-dense", 96) == ["bf16-dense"]
    (t,) = budget.measure_throughput(LowResCNN(2, (8, 8, 8)), [32], "bf16-dense", 4, seconds=0.01)
    assert t.precision == "bf16-dense" and t.train > 0 and t.infer > 0


@pytest.mark.parametrize("name,fused", [("adamw", True), ("adam", True), ("sgd", None)])
def test_adam_and_adamw_run_fused(name, fused):
    params = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(4))]
    opt = make_optimizer([{"params": params[:1]}, {"params": iter(params[1:2]), "lr": 1e-4}, {"params": params[2]}],
                         OptimizerSettings(name))
    assert opt.defaults.get("fused") is fused
    # every parameter reaches the optimizer, a group's generator and a lone tensor included
    assert [p for g in opt.param_groups for p in g["params"]] == params
    assert make_optimizer(nn.Linear(2, 2).parameters(), OptimizerSettings(name)).param_groups[0]["params"]


def test_the_plan_sets_the_precision_it_measured_unless_the_user_chose_one():
    """A plan's measured precision applies where --precision was left out or given as auto (asking for
    it); any other given precision is kept."""
    from visiontune.training.budget import Plan
    from visiontune.training.config import TrainConfig

    plan = Plan(900.0, "finetune", 96, 3, 1, "crop-flip", "squash", {"train": 600.0},
                recipe={"precision": "bf16-dense"})
    for given, expected in ((None, "bf16-dense"), ("auto", "bf16-dense"), ("32", "32"), ("bf16", "bf16")):
        options = {"data": "d"} if given is None else {"data": "d", "precision": given}
        assert plan.apply(TrainConfig.from_dict(options)).get("precision") == expected


def test_fused_and_unfused_adamw_take_the_same_step():
    torch.manual_seed(0)
    weights = torch.randn(5)
    fused, plain = nn.Parameter(weights.clone()), nn.Parameter(weights.clone())
    opts = [make_optimizer([fused], OptimizerSettings("adamw", lr=0.1)),
            torch.optim.AdamW([plain], lr=0.1, weight_decay=0.01)]
    for _ in range(3):
        for p, opt in zip((fused, plain), opts):
            opt.zero_grad()
            p.square().sum().backward()
            opt.step()
    torch.testing.assert_close(fused, plain)
