"""The low-resolution strategy: the compact networks build offline, whiten their input, train from
scratch end to end and reload; the planner weighs them only for small images and enough of them,
and picks one only where its expected accuracy (the measured curves) beats the fine-tune's;
precision is measured, not assumed."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST_FLAGS, make_folder, vt_main
from test_budget import facts  # the CIFAR-like facts on the fast machine table

from visiontune.core.errors import ModelError
from visiontune.models.factory import build_model, rebuild
from visiontune.models.lowres import LOWRES_MODELS, LowResCNN, is_lowres
from visiontune.training import budget
from visiontune.training.budget import Plan, Throughput, measure_throughput, plan_run
from visiontune.training.lowres_plan import (
    LOWRES_MIN_IMAGES,
    LOWRES_SIDE,
    MIN_SMALL_FINETUNE_PASSES,
    LowResSpeed,
    choose_plan,
    considers_lowres,
    expected_accuracy,
    finetune_plans,
)

# a machine where fine-tuning the pretrained network is ~4x slower than test_budget's TABLE (as on AVX2
# against AVX512-BF16)
SLOW = [Throughput(32, 118, 1142), Throughput(48, 87, 602), Throughput(64, 67, 384), Throughput(96, 47, 198),
        Throughput(128, 28, 101)]


def speed(train: float, infer: float, model: str = "lowres_cnn", precision: str = "bf16") -> LowResSpeed:
    return LowResSpeed(model, Throughput(LOWRES_SIDE, train, infer, precision))


@pytest.mark.parametrize("name", list(LOWRES_MODELS))
def test_every_lowres_network_builds_offline_and_reloads(name):
    model, arch, pre = build_model(name, 4, "none")
    assert (arch.source, arch.name, arch.classifier) == ("timm", name, "head")
    assert pre.input_size == (3, LOWRES_SIDE, LOWRES_SIDE) and is_lowres(name) and is_lowres("timm:" + name)
    model.fit_whitening(torch.randn(32, 3, 32, 32))
    again = rebuild(arch)
    again.load_state_dict(model.state_dict())  # the whitening is in the state dict (a buffer)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(again.eval()(x), model.eval()(x))


def test_pretrained_weights_are_refused_naming_scratch():
    with pytest.raises(ModelError, match="no pretrained weights.*--strategy scratch"):
        build_model("lowres_cnn", 3, "default")


def test_whitening_decorrelates_the_patches():
    """The first layer maps 2x2 patches of the data to unit-variance, uncorrelated channels."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(256, 1, 32, 32, generator=gen)
    images = torch.cat([base, 0.5 * base + 0.1 * torch.randn(256, 1, 32, 32, generator=gen),
                        torch.randn(256, 1, 32, 32, generator=gen)], 1)  # correlated channels
    net = LowResCNN(3, (8, 8, 8))
    net.fit_whitening(images)
    out = torch.nn.functional.conv2d(images, net.whiten_weight[:12])
    flat = out.permute(1, 0, 2, 3).reshape(12, -1)
    cov = torch.cov(flat)
    assert (cov.diagonal() - 1).abs().max() < 0.1  # unit variance (eps shrinks it a little)
    assert (cov - torch.diag(cov.diagonal())).abs().max() < 0.05
    torch.testing.assert_close(net.whiten_weight[12:], -net.whiten_weight[:12])


def test_classifier_module_gives_the_networks_logits():
    """The logit scale is inside the classifier: head(features) is what the network outputs."""
    net = LowResCNN(5, (8, 8, 8)).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(net.head(net.forward_features(x)), net(x))


def test_considers_lowres_only_for_small_images_many_of_them_and_no_other_network():
    assert considers_lowres(LOWRES_MIN_IMAGES, 32, {})
    assert not considers_lowres(LOWRES_MIN_IMAGES - 1, 32, {})
    assert not considers_lowres(50_000, 96, {})
    assert not considers_lowres(50_000, 32, {}, single_label=False)
    assert not considers_lowres(50_000, 32, {"model": "resnet18"})
    assert not considers_lowres(50_000, 32, {"strategy": "finetune"})
    assert not considers_lowres(50_000, 32, {"img_size": 64})
    assert not considers_lowres(50_000, 32, {"freeze_bottom": 2})  # a pretrained network's layers to keep
    assert considers_lowres(50_000, 32, {"freeze_bottom": 0})  # given as its default (a YAML template): nothing kept
    assert considers_lowres(50_000, 32, {"model": "lowres_cnn_wide", "strategy": "scratch"})


def test_planner_picks_the_lowres_network_where_its_curve_wins():
    f = facts(20 * 60, elapsed=20, throughputs=SLOW)
    plan = choose_plan(f, {}, [speed(300, 2000)])
    assert (plan.strategy, plan.img_size, plan.recipe["model"], plan.recipe["precision"]) == (
        "scratch", LOWRES_SIDE, "lowres_cnn", "bf16")
    base = plan_run(f, {})
    steps = f.steps_per_epoch
    assert base.strategy == "finetune" and expected_accuracy(plan, steps) > expected_accuracy(base, steps)
    assert plan.total <= f.budget and plan.freeze_epochs == 0 and plan.recipe["tta"] == "flip"
    assert "Expected accuracy" in plan.reason and "finetune at" in plan.reason


def test_planner_keeps_the_finetune_where_its_curve_wins():
    """On the fast table fine-tuning at 96 px is expected above the compact network at full speed."""
    f = facts(15 * 60, elapsed=20)
    plan = choose_plan(f, {}, [speed(520, 4000)])
    base = plan_run(f, {})
    assert (plan.strategy, plan.img_size, plan.epochs) == (base.strategy, base.img_size, base.epochs)
    assert "model" not in plan.recipe and "lowres_cnn" in plan.reason


def test_one_epoch_of_a_random_network_is_not_a_plan():
    """Where fewer than two epochs fit, the compact network is not weighed (unless the user named it)."""
    f = facts(5 * 60, elapsed=20, throughputs=SLOW)
    assert "model" not in choose_plan(f, {}, [speed(200, 2000)]).recipe
    named = choose_plan(f, {"model": "lowres_cnn", "strategy": "scratch"}, [speed(200, 2000)])
    assert named.recipe["model"] == "lowres_cnn" and named.epochs == 1


def test_a_probe_is_ranked_below_the_plans_that_train_and_says_so():
    """5 minutes on the slow table: too short to fine-tune, so the base plan is a probe; the compact
    network's two epochs win, and the reason names the probe without a made-up expectation."""
    f = facts(5 * 60, elapsed=20, throughputs=SLOW)
    base = plan_run(f, {})
    plan = choose_plan(f, {}, [speed(520, 4000)])
    assert base.strategy == "linear-probe" and plan.recipe["model"] == "lowres_cnn"
    assert "linear-probe at" in plan.reason and "no curve" in plan.reason and "0.000" not in plan.reason


def test_planner_weighs_several_networks_by_their_curves():
    """A long budget buys the wider network enough epochs to beat the small one; a short one does not."""
    from visiontune.training.lowres_plan import plan_lowres

    def best(seconds: float) -> str:
        f = facts(seconds, elapsed=20, throughputs=SLOW)
        plans = [plan_lowres(f, {}, s) for s in (speed(520, 4000), speed(210, 2000, "lowres_cnn_wide"))]
        return max(plans, key=lambda p: expected_accuracy(p, f.steps_per_epoch)).recipe["model"]

    assert best(4 * 3600) == "lowres_cnn_wide" and best(20 * 60) == "lowres_cnn"
    assert choose_plan(facts(20 * 60, elapsed=20, throughputs=SLOW), {},
                       [speed(520, 4000), speed(210, 2000, "lowres_cnn_wide")]).recipe["model"] == "lowres_cnn"


def test_users_options_win_over_the_plan():
    f = facts(15 * 60, elapsed=20)
    plan = choose_plan(f, {"strategy": "scratch", "model": "lowres_cnn", "precision": "32", "epochs": 3},
                       [speed(520, 4000)])
    assert plan.epochs == 3 and "precision" not in plan.recipe
    assert choose_plan(f, {"strategy": "finetune"}, [speed(520, 4000)]).strategy == "finetune"


def test_plan_with_lowres_recipe_round_trips(tmp_path):
    plan = choose_plan(facts(20 * 60, elapsed=20, throughputs=SLOW), {}, [speed(300, 2000)])
    assert plan.recipe["model"] == "lowres_cnn"
    plan.save(tmp_path / "plan.json")
    assert Plan.from_dict(json.loads((tmp_path / "plan.json").read_text())) == plan


def test_throughput_keeps_the_faster_precision(monkeypatch):
    """With --precision auto on a CPU with native bf16 both are measured and the faster kept."""
    monkeypatch.setattr(budget, "precisions_to_measure", lambda precision, size: ["32", "bf16"])
    speeds = {"32": 100.0, "bf16": 180.0}

    def fake(run, batch, seconds):
        return speeds[run.precision]

    monkeypatch.setattr(budget, "_step_images_per_second", fake)
    (t,) = measure_throughput(LowResCNN(2, (8, 8, 8)), [32], "auto", 4)
    assert (t.precision, t.train) == ("bf16", 180.0)
    speeds.update({"32": 250.0})
    (t,) = measure_throughput(LowResCNN(2, (8, 8, 8)), [32], "auto", 4)
    assert (t.precision, t.train) == ("32", 250.0)


def test_an_inference_only_measurement_does_not_rank_precisions(monkeypatch):
    """A probe's measurement (inference only) takes the precision the rule resolves to: ranking two
    would cost about what a probe's feature pass could save."""
    monkeypatch.setattr(budget, "precisions_to_measure", lambda precision, size: ["32", "bf16"])
    monkeypatch.setattr(budget, "resolve_precision", lambda precision, size, allowed: "bf16")
    timed = []

    def fake(run, batch, seconds):
        timed.append((type(run).__name__, run.precision))
        return 100.0

    monkeypatch.setattr(budget, "_step_images_per_second", fake)
    (t,) = measure_throughput(LowResCNN(2, (8, 8, 8)), [32], "auto", 4, train=False)
    assert (t.precision, t.train, t.infer) == ("bf16", 0.0, 100.0)
    assert timed == [("_InferStep", "bf16")]


def test_explicit_precision_is_the_only_one_measured():
    assert budget.precisions_to_measure("32", 224) == ["32"]
    assert budget.precisions_to_measure("bf16", 32) == ["bf16"]


def test_lowres_network_trains_from_scratch_end_to_end(tmp_path, capsys):
    """--model lowres_cnn (scratch implied, its recipe unless given): whitening set from the data,
    trained, saved, evaluated, exported."""
    import yaml

    data = make_folder(tmp_path / "small images", per_class=8, size=32)
    run = tmp_path / "run dir"
    code, out, err = vt_main(capsys, "train", data, "--model", "lowres_cnn", "--epochs", "1", "--run-dir", run,
                             "--no-report", *[f for f in FAST_FLAGS if f not in ("--img-size", "32")])
    assert code == 0, err
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (config["strategy"], config["optimizer"], config["label_smoothing"], config["ema"], config["tta"],
            config["augment"], config["batch_size"]) == ("scratch", "sgd", 0.2, True, "flip", "crop-flip", 8)
    card = json.loads((run / "model" / "model.json").read_text())
    assert card["architecture"]["name"] == "lowres_cnn"
    from safetensors.torch import load_file

    whiten = load_file(run / "model" / "model.safetensors")["whiten_weight"]
    assert whiten.abs().sum() > 0  # set from the training images, not the zeros it was built with
    code, out, err = vt_main(capsys, "evaluate", run, data, "--json")
    assert code == 0, err
    assert 0.0 <= json.loads(out)["accuracy"] <= 1.0
    code, out, err = vt_main(capsys, "export", run, "--out", tmp_path / "model.onnx")
    assert code == 0 and "top-1 agreement 100.00%" in out, out + err
    code, out, err = vt_main(capsys, "export", run, "--format", "hf", "--out", tmp_path / "hf")
    assert code != 0 and "not in timm" in err and "--format onnx" in err and not (tmp_path / "hf").exists()


def test_lowres_plan_counts_decoding_only_where_its_small_images_do_not_fit_in_memory():
    """The fine-tune's larger inputs may not fit in memory where 32-px ones do: each candidate is costed
    with its own (a plan that re-read 40,000 images every epoch planned 7 epochs where 9 fitted)."""
    f = facts(20 * 60, elapsed=20, decode_s=0.0007, in_memory=False, throughputs=SLOW)
    held = choose_plan(f, {}, [LowResSpeed("lowres_cnn", Throughput(LOWRES_SIDE, 520, 4000, "bf16"), True)])
    reread = choose_plan(f, {}, [LowResSpeed("lowres_cnn", Throughput(LOWRES_SIDE, 520, 4000, "bf16"), False)])
    assert held.recipe["model"] == reread.recipe["model"] == "lowres_cnn"
    assert held.epochs > reread.epochs and held.projected["load"] > 0 == reread.projected["load"]


def test_compact_networks_are_measured_only_where_their_ceiling_could_beat_the_finetune():
    """Measuring them costs seconds of the budget: skipped where the fine-tune's expected accuracy is
    already at or above every compact network's ceiling (CIFAR-10 in an hour on the fast table)."""
    from visiontune.training.lowres_plan import lowres_may_win

    long = facts(3600, elapsed=20)
    assert not lowres_may_win(plan_run(long, {}), long, {})
    assert lowres_may_win(plan_run(long, {}), long, {"model": "lowres_cnn"})
    slow = facts(30 * 60, elapsed=20, throughputs=SLOW)
    assert lowres_may_win(plan_run(slow, {}), slow, {})


# two days of `--time 15m` on CIFAR-10 on one AVX512-BF16 machine (bench/RESULTS.md): 96 px trained at 143 img/s
# on one (run D: 0.9031 held-out at 96 px), at 102 on the other (run A: 3 whole epochs fitted only at 64 px, and
# the plan was lowres_cnn, 0.8723)
DAY_D = [Throughput(48, 353, 2020), Throughput(64, 271, 1394), Throughput(96, 143, 431), Throughput(128, 73, 240)]
DAY_A = [Throughput(48, 329, 2020), Throughput(64, 228, 987), Throughput(96, 102, 444), Throughput(128, 52, 152)]
COMPACT = [speed(495, 1772), speed(210, 698, "lowres_cnn_wide")]


def test_a_larger_input_for_fewer_passes_where_the_curves_expect_more():
    """On the slower day, in 13 minutes, the largest input where 3 whole epochs fit is 64 px; the curves
    expect more of the 1.5+ passes that fit at 96 px (the last partial) than of 64 px or the compact
    networks."""
    slow = facts(13 * 60, elapsed=41, decode_s=0.0007, throughputs=DAY_A, num_classes=10)
    base, plan = plan_run(slow, {}), choose_plan(slow, {}, COMPACT)
    assert base.img_size == 64 and (plan.strategy, plan.img_size) == ("finetune", 96)
    passes = (plan.max_steps or (plan.epochs - plan.freeze_epochs) * slow.steps_per_epoch) / slow.steps_per_epoch
    assert MIN_SMALL_FINETUNE_PASSES <= passes < 2 and plan.total <= slow.budget
    steps = slow.steps_per_epoch
    others = [p for p in finetune_plans(slow, {}) if p.img_size != 96]
    assert expected_accuracy(plan, steps) > max(expected_accuracy(p, steps) for p in [base, *others])
    assert "passes over the data fit at 96 px" in plan.reason and "finetune at 64 px" in plan.reason
    assert len({c["size"] for c in plan.candidates if "model" not in c}) == 4  # every measured size, as planned
    # the faster day's plan is the one the whole-epoch rule gives; an hour's is the largest input's
    fast = facts(15 * 60, elapsed=38, decode_s=0.0007, throughputs=DAY_D, num_classes=10)
    assert choose_plan(fast, {}, COMPACT).img_size == plan_run(fast, {}).img_size == 96
    hour = facts(3600, elapsed=38, decode_s=0.0007, throughputs=DAY_D, num_classes=10)
    assert choose_plan(hour, {}, COMPACT).img_size == plan_run(hour, {}).img_size == 128


@pytest.mark.parametrize("change", [{"native_side": 300}, {"single_label": False}, {"n_train": 5000},
                                    {"trained_side": 96}])
def test_the_curves_weigh_input_sizes_only_where_they_were_measured(change):
    """Photos, multi-label data, few images or a trained model continuing: the whole-epoch rule's plan."""
    f = facts(15 * 60, elapsed=41, throughputs=DAY_A, num_classes=10, **change)
    assert [p.img_size for p in finetune_plans(f, {})] == [plan_run(f, {}).img_size]


@pytest.mark.parametrize("given", [{"img_size": 64}, {"epochs": 4}, {"max_steps": 3000}, {"auto_batch_size": True},
                                   {"model": "efficientnet_lite1"}, {"strategy": "progressive"},
                                   {"freeze_bottom": 3}])
def test_the_users_size_or_length_is_not_weighed_against_the_curves(given):
    f = facts(15 * 60, elapsed=41, throughputs=DAY_A, num_classes=10)
    assert len(finetune_plans(f, given)) == 1
    assert len(finetune_plans(f, {"freeze_bottom": 0})) > 1  # nothing frozen: the curves' sizes are weighed


@pytest.mark.parametrize("minutes", [8, 11, 13, 15])
@pytest.mark.parametrize("change,given", [({}, {"strategy": "finetune"}), ({"processes": 2}, {}),
                                          ({}, {"teacher": "teacher-run"})])
def test_a_fixed_strategys_fallback_is_not_weighed_as_a_plan_of_passes(minutes, change, given):
    """With the strategy fixed (given, several processes, a teacher) a size where 1.5 passes do not fit
    falls back to one epoch stopped at the deadline: never one of the sizes the curves weigh."""
    f = facts(minutes * 60, elapsed=41, decode_s=0.0007, throughputs=DAY_A, num_classes=10, **change)
    for plan in finetune_plans(f, given)[1:]:
        passes = (plan.max_steps or (plan.epochs - plan.freeze_epochs) * f.steps_per_epoch) / f.steps_per_epoch
        assert plan.strategy == "finetune" and passes >= MIN_SMALL_FINETUNE_PASSES and plan.total <= f.budget


def test_only_a_plan_that_predicts_with_one_view_expects_less():
    """The curves' runs kept flip-zoom: a plan without --tta expects TTA_GAIN less; the user's --tta,
    which the plan's recipe does not repeat, counts as the plan's own."""
    f = facts(15 * 60, elapsed=41, decode_s=0.0007, throughputs=DAY_D, num_classes=10)
    steps = f.steps_per_epoch
    plain = plan_run(f, {"tta": "none"})
    assert expected_accuracy(plain, steps, "none") == pytest.approx(expected_accuracy(plain, steps, "auto")
                                                                      - budget.TTA_GAIN)
    assert expected_accuracy(plain, steps, "flip-zoom") == expected_accuracy(plain, steps, "auto")
