"""The time budget's low-resolution candidate: a compact CNN trained from scratch at the images' size.

For small images (median side up to :data:`LOWRES_MAX_SIDE`) and enough of them (at least
:data:`LOWRES_MIN_IMAGES`: a network from random weights needs many), :func:`choose_plan`
measures the networks of :data:`~visiontune.models.lowres.LOWRES_MODELS` on this machine
(:func:`measure_lowres`, fp32 and bf16), plans each for the budget like the fine-tune
(:func:`plan_lowres`) and keeps the plan whose expected accuracy is highest. Expected accuracy
is ``ceiling - slope / epochs`` with the constants of :data:`~visiontune.training.budget.FINETUNE_CURVE` and
:data:`LOWRES_CURVE`, fitted to held-out accuracies measured on CIFAR-10 (32,000 training
images; bench/RESULTS.md, "Low resolution"); the machine's speed decides how many epochs each
candidate gets, so a slow CPU, or few images, keeps the fine-tune where it is better.

Example:
    >>> table = [Throughput(64, 300, 1600), Throughput(96, 150, 520)]  # a CPU fine-tuning Lite0 at this speed
    >>> facts = Facts(15 * 60, n_train=32_000, n_val=8_000, native_side=32, default_side=224,
    ...               throughputs=table, elapsed=20.0)
    >>> fast = [LowResSpeed("lowres_cnn", Throughput(32, 520, 4000, "bf16"))]
    >>> choose_plan(facts, {}, fast).strategy  # 0.906 expected at 96 px against the compact network's 0.882
    'finetune'
    >>> slow = [Throughput(64, 67, 384), Throughput(96, 47, 198)]  # one where fine-tuning is 4x slower
    >>> plan = choose_plan(replace(facts, throughputs=slow), {}, fast)
    >>> plan.strategy, plan.recipe["model"], plan.img_size, plan.epochs, plan.recipe["precision"]
    ('scratch', 'lowres_cnn', 32, 11, 'bf16')
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..models.factory import build_model
from ..models.lowres import LOWRES_MODELS, is_lowres
from .budget import (
    FINETUNE_CURVE,
    SAFETY,
    TTA_GAIN,
    Facts,
    Plan,
    Throughput,
    epoch_seconds,
    finetune_curve,
    measure_throughput,
    measured_precision,
    phase_costs,
    plan_run,
)

LOWRES_MAX_SIDE = 48         # images' median side up to which a network built for the size is considered
LOWRES_MIN_IMAGES = 10_000   # training images below which from-scratch loses to pretrained features
LOWRES_SIDE = 32             # the networks' input side
LOWRES_MAX_EPOCHS = 60       # beyond this, more epochs of the same network buy nothing measurable
LOWRES_MIN_EPOCHS = 2        # from random weights, one epoch is not a model (the curves start at 4)
LOWRES_BATCH = 512           # images per step: the recipe's LR is set for it
LOWRES_WARMUP_SHARE = 0.2    # of the epochs, linear LR warm-up (then cosine decay)
# the fast-CIFAR recipe (label smoothing 0.2, SGD-Nesterov at a high LR, weight averaging, flip
# test-time augmentation, pad-and-crop + flip), written for LOWRES_BATCH. LR 1.5 and weight decay 4e-6 are
# airbench's per-example-sum settings in mean-loss form; at 4 epochs on CIFAR-10 they reached 0.861
# against 0.831 for LR 0.4 / 5e-5 (and 0.884 after 10 epochs for the ResNet recipe's 0.4 / 5e-4)
LOWRES_RECIPE = {"optimizer": "sgd", "lr": 1.5, "momentum": 0.85, "weight_decay": 4e-6, "batch_size": LOWRES_BATCH,
                 "label_smoothing": 0.2, "ema": True, "tta": "flip"}

# expected held-out accuracy after E epochs: ceiling - slope / E (CIFAR-10, 32,000-35,000 training images; the
# fine-tune's is budget.FINETUNE_CURVE). lowres_cnn: held-out CIFAR-10 accuracy of the whole command, 35,000
# training images: 0.871 after 8.4 epochs (--time 15m) and 0.889 after 19 (--time 30m). lowres_cnn_wide:
# airbench's published ratio (the wide network 95% in 15 epochs where the small one is 94% in 10: +1 point of
# ceiling, 1.5x the slope)
LOWRES_CURVE = {"lowres_cnn": (0.904, 0.27), "lowres_cnn_wide": (0.914, 0.405)}
# where the curves apply (curves_apply), the fine-tune is also weighed at each input where this many passes over
# the data fit after the head's warm-up (the last partial), not only where MIN_FINETUNE_EPOCHS whole epochs do: on
# CIFAR-10 in 15 minutes (AVX512-BF16, bench/RESULTS.md "Progressive resizing") 1.5 passes at 96 px scored 0.8955
# held-out, where a slower day's probe had planned lowres_cnn (0.8723) or 64 px for 5 epochs (0.871 for 4)
MIN_SMALL_FINETUNE_PASSES = 1.5
PROBE_ACCURACY = 0.0  # a probe on features of 32-px images upscaled: below any plan that trains


@dataclass(frozen=True)
class LowResSpeed:
    """One network of :data:`LOWRES_MODELS` and its measured speed at :data:`LOWRES_SIDE`;
    ``in_memory``: whether the images, kept at that side, fit in memory (decoded once)."""

    model: str
    throughput: Throughput
    in_memory: bool = True


def considers_lowres(n_train: int, native_side: int, fixed: dict[str, Any], single_label: bool = True) -> bool:
    """Whether a plan weighs the low-resolution networks: small images, enough of them, one label
    each (the curves are single-label), and none of the options that fix another network or recipe
    (``--model``, ``--strategy`` other than scratch, ``--img-size``, ``--freeze-bottom``)."""
    model_ok = "model" not in fixed or is_lowres(str(fixed["model"]))
    return (single_label and model_ok and native_side <= LOWRES_MAX_SIDE and n_train >= LOWRES_MIN_IMAGES
            and fixed.get("strategy", "scratch") == "scratch" and "img_size" not in fixed
            and not fixed.get("freeze_bottom"))


def measure_lowres(num_classes: int, precision: str, fixed: dict[str, Any], in_memory: bool = True
                   ) -> list[LowResSpeed]:
    """Measure each network of :data:`LOWRES_MODELS` (the user's, if ``--model`` names one) at
    :data:`LOWRES_SIDE`, in the faster precision (~3 s each)."""
    names = [str(fixed["model"]).removeprefix("timm:")] if "model" in fixed else list(LOWRES_MODELS)
    out = []
    for name in names:
        model, _, _ = build_model(name, num_classes, "none")
        # ~450 img/s: a second holds 3-4 steps of a quarter batch, as many as the fine-tune's probe at 96 px
        (t,) = measure_throughput(model, [LOWRES_SIDE], precision, fixed.get("batch_size", LOWRES_BATCH) // 4,
                                  seconds=1.0)
        out.append(LowResSpeed(name, t, in_memory))
    return out


def network_recipe(given: set[str] | frozenset[str], epochs: int) -> dict[str, Any]:
    """The options a compact network trains with when the user named it without a time budget
    (``--model lowres_cnn --epochs 20``): :data:`LOWRES_RECIPE` and its augmentation, except the
    options the user gave. A budgeted run gets the same from :func:`plan_lowres`.

    Example:
        >>> sorted(network_recipe({"lr"}, 10))[:4], network_recipe({"lr"}, 10)["warmup_epochs"]
        (['augment', 'batch_size', 'ema', 'label_smoothing'], 2.0)
    """
    recipe = {**LOWRES_RECIPE, "augment": "crop-flip", "resize_mode": "squash", "strategy": "scratch",
              "warmup_epochs": round(LOWRES_WARMUP_SHARE * epochs, 1)}
    return {k: v for k, v in recipe.items() if k not in given}


def _curve(ceiling_slope: tuple[float, float], epochs: float) -> float:
    ceiling, slope = ceiling_slope
    return ceiling - slope / epochs if epochs > 0 else PROBE_ACCURACY


def fine_tuning_epochs(plan: Plan, steps_per_epoch: int) -> float:
    """A fine-tune plan's epochs after the head's warm-up, the partial last one's share included."""
    return plan.max_steps / steps_per_epoch if plan.max_steps is not None else plan.epochs - plan.freeze_epochs


def expected_accuracy(plan: Plan, steps_per_epoch: int, given_tta: str | None = None) -> float:
    """The held-out accuracy the curves expect of ``plan`` (see the module's docstring); ``given_tta``:
    the user's ``--tta``, which a plan's recipe does not repeat."""
    if plan.strategy == "linear-probe":
        return PROBE_ACCURACY
    model = plan.recipe.get("model")
    if model in LOWRES_CURVE:
        return _curve(LOWRES_CURVE[model], plan.epochs)
    trained = fine_tuning_epochs(plan, steps_per_epoch)
    # the curves' runs kept --tta auto's flip-zoom: a plan that predicts with one view expects its smallest gain less
    views = plan.recipe.get("tta", given_tta)
    return _curve(finetune_curve(plan.img_size), trained) - (TTA_GAIN if views in (None, "none") else 0.0)


def curves_apply(facts: Facts, fixed: dict[str, Any]) -> bool:
    """Whether the fine-tune's curves (:data:`~visiontune.training.budget.FINETUNE_CURVE`, measured
    with EfficientNet-Lite0 on CIFAR-10) may choose its input size: small images, enough of them, one
    label each, a fresh run of the embedded network whose size and length the user left to the plan,
    with every layer trained (the curves were measured so)."""
    return (facts.single_label and facts.native_side <= LOWRES_MAX_SIDE and facts.n_train >= LOWRES_MIN_IMAGES
            and facts.trained_side is None and fixed.get("strategy", "finetune") == "finetune"
            and not {"model", "img_size", "epochs", "max_steps", "auto_batch_size"} & fixed.keys()
            and not fixed.get("freeze_bottom"))


def finetune_plans(facts: Facts, fixed: dict[str, Any]) -> list[Plan]:
    """:func:`~visiontune.training.budget.plan_run`'s fine-tune first (the largest input where
    :data:`~visiontune.training.budget.MIN_FINETUNE_EPOCHS` whole epochs fit), then, where
    :func:`curves_apply`, a fine-tune at each input a curve was measured at where
    :data:`MIN_SMALL_FINETUNE_PASSES` fit (the last partial): :func:`choose_plan` keeps the one the
    curves expect most of."""
    base = plan_run(facts, fixed)
    if not curves_apply(facts, fixed):
        return [base]
    steps = facts.steps_per_epoch
    others = [plan_run(replace(facts, throughputs=[t], min_passes=MIN_SMALL_FINETUNE_PASSES), fixed)
              for t in facts.throughputs if t.size in FINETUNE_CURVE]
    # a size where the passes do not fit gives a probe, or with a fixed strategy (--strategy finetune, several
    # processes, a teacher) the fallback of one epoch stopped at the deadline: neither is a plan of this minimum
    others = [p for p in others if p.strategy == "finetune" and p.total <= facts.budget
              and fine_tuning_epochs(p, steps) >= MIN_SMALL_FINETUNE_PASSES]
    same = (base.img_size, base.epochs, base.max_steps, base.recipe)  # the base's own size may give its plan again
    return [base, *[p for p in others if (p.img_size, p.epochs, p.max_steps, p.recipe) != same]]


def best_finetune(facts: Facts, fixed: dict[str, Any]) -> Plan:
    """The plan of :func:`finetune_plans` with the highest :func:`expected_accuracy` (the first where tied)."""
    plans = finetune_plans(facts, fixed)
    return max(plans, key=lambda p: expected_accuracy(p, facts.steps_per_epoch, fixed.get("tta")))


def lowres_may_win(base: Plan, facts: Facts, fixed: dict[str, Any]) -> bool:
    """Whether measuring the compact networks can change ``base`` (the fine-tune's plan): only if a
    curve's ceiling is above what ``base`` is expected to reach, or the user named one. Measuring
    them costs ~10 s of the budget, which on CIFAR-10 in 15 minutes was the difference between
    fine-tuning at 96 px (0.895) and at 64 (0.87)."""
    if "model" in fixed:
        return True
    return max(c for c, _ in LOWRES_CURVE.values()) > expected_accuracy(base, facts.steps_per_epoch, fixed.get("tta"))


def plan_lowres(facts: Facts, fixed: dict[str, Any], speed: LowResSpeed) -> Plan | None:
    """The run of ``speed.model`` from scratch that fits ``facts.budget`` (whole epochs, at most
    :data:`LOWRES_MAX_EPOCHS`), or None where fewer than :data:`LOWRES_MIN_EPOCHS` fit (one, for a
    network the user named)."""
    t = speed.throughput
    recipe = {"model": speed.model, **{k: v for k, v in LOWRES_RECIPE.items() if k not in fixed},
              **measured_precision(t, fixed)}
    tta = fixed.get("tta", recipe.get("tta"))
    facts = replace(facts, in_memory=speed.in_memory)  # 32-px images fit where the fine-tune's larger ones may not
    available = facts.budget * (1 - SAFETY) - facts.elapsed

    def costs(epochs: int) -> dict[str, float]:
        return {"start": facts.elapsed, **phase_costs(t, facts.n_train, facts.n_val, facts.n_test, epochs, 0, True,
                                                       facts.decode_s, tta, facts.in_memory, facts.unknown)}

    per_epoch = epoch_seconds(t, facts.n_train, facts.n_val, tta, 0.0 if facts.in_memory else facts.decode_s)
    fixed_cost = sum(costs(1).values()) - facts.elapsed - per_epoch  # decoding once, the finish
    fit = int((available - fixed_cost) // per_epoch) if per_epoch > 0 else 0
    epochs = fixed.get("epochs", min(fit, LOWRES_MAX_EPOCHS))
    if epochs < (1 if "model" in fixed else LOWRES_MIN_EPOCHS):  # the user's network runs what fits
        return None
    if "warmup_epochs" not in fixed:
        recipe["warmup_epochs"] = round(LOWRES_WARMUP_SHARE * epochs, 1)
    reason = (f"{fit} epochs of {speed.model} from scratch fit at {LOWRES_SIDE} px "
              f"({per_epoch:.1f} s per epoch, {t.train:.0f} img/s training in {t.precision or 'the set precision'})")
    return Plan(facts.budget, "scratch", LOWRES_SIDE, epochs, 0, fixed.get("augment", "crop-flip"),
                fixed.get("resize_mode", "squash"), costs(epochs), recipe=recipe,
                candidates=[{"model": speed.model, "size": LOWRES_SIDE, "epochs_that_fit": fit,
                             "seconds_per_epoch": round(per_epoch, 1)}],
                throughputs=[{"model": speed.model, "size": t.size, "train": t.train, "infer": t.infer,
                              "precision": t.precision}],
                reason=reason)


def choose_plan(facts: Facts, fixed: dict[str, Any], lowres: list[LowResSpeed]) -> Plan:
    """:func:`~visiontune.training.budget.plan_run`'s plan, or a low-resolution network's where
    :func:`expected_accuracy` says it is more accurate in the same budget. The plan's reason names
    every candidate's expected accuracy; the fine-tune is weighed at each input size where
    :func:`curves_apply` (:func:`finetune_plans`)."""
    finetunes = finetune_plans(facts, fixed)
    base = finetunes[0]
    plans = []
    if lowres and ("model" in fixed or "strategy" not in fixed):
        plans = [p for p in (plan_lowres(facts, fixed, s) for s in lowres) if p is not None]
        if "model" in fixed:  # the user named a low-resolution network: its plan, whatever the curves say
            return plans[0] if plans else base
    if len(finetunes) + len(plans) == 1:
        return base
    steps = facts.steps_per_epoch
    scored = sorted([(expected_accuracy(p, steps, fixed.get("tta")), i, p) for i, p in enumerate([*finetunes, *plans])],
                    key=lambda x: (-x[0], x[1]))
    best = scored[0][2]
    names = {id(p): f"{p.strategy} at {p.img_size} px" + (
        f" for {fine_tuning_epochs(p, steps):.2f} epochs{', --tta auto' if p.recipe.get('tta') else ''}"
        if len(finetunes) > 1 and p.strategy != "linear-probe" else "") for p in finetunes}
    summary = "; ".join(f"{names.get(id(p), p.recipe.get('model'))} "
                        + ("(no curve: ranked below the plans that train)" if p.strategy == "linear-probe"
                           else f"{acc:.3f}") for acc, _, p in scored)
    best.reason += f". Expected accuracy (curves measured on CIFAR-10): {summary}"
    best.candidates = base.candidates + [c for p in plans for c in p.candidates]  # a fine-tune's: every size
    best.throughputs = base.throughputs + [t for p in plans for t in p.throughputs]
    return best
