"""Time budgets: measure this machine, plan the run that fits, forecast, stop at the deadline.

``--time 1h`` makes the whole command (scan, features, training, evaluation, calibration,
report) end within the hour. Before training, :func:`measure_throughput` measures how many
images per second this machine trains and infers at candidate input sizes (a few seconds); those
measurements and the data's statistics are the :class:`Facts`, and :func:`plan_run` (a pure
function of the facts and the options the user fixed) picks the strategy, input size and number
of epochs that fit. :meth:`Plan.apply` is the one place a plan changes a config. The LR schedule
spans the planned epochs; :class:`Deadline` still stops at the budget whatever was measured,
keeping the best epoch. A run given neither ``--time`` nor ``--epochs`` plans for
:data:`DEFAULT_TIME` (:func:`run_budget`); with ``--time none`` or ``--epochs``, :class:`Forecast`
prints the projected duration of the configured run once the first batches are timed.

Example:
    >>> parse_duration("1h30m"), parse_duration("20m"), parse_duration("45s")
    (5400.0, 1200.0, 45.0)
    >>> table = [Throughput(32, 700, 4700), Throughput(64, 300, 1600), Throughput(96, 150, 520)]
    >>> facts = Facts(15 * 60, n_train=40_000, n_val=8_000, native_side=32, default_side=224,
    ...               throughputs=table, elapsed=20.0)
    >>> plan = plan_run(facts)
    >>> plan.strategy, plan.img_size, plan.epochs, plan.max_steps  # 2 fine-tuning epochs fit, then part of a 3rd
    ('finetune', 96, 4, 2925)
    >>> plan.recipe["tta"], plan_run(facts, {"tta": "none"}).max_steps  # measuring TTA at the end costs 275 steps
    ('auto', 3200)
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from ..core.hardware import autocast, cpu_supports_bf16, device, resolve_precision, train_autocast
from ..core.registry import TRAIN_PRECISIONS
from ..core.safe_io import atomic_write_text
from ..data.image import try_load
from ..data.preprocess import Preprocessing, resize
from ..models.factory import fit_input_size
from ..models.tta import view_cost
from .config import TrainConfig, duration_seconds, no_budget
from .optim import OptimizerSettings, make_optimizer
from .probe_selection import selection_seconds
from .tta_choice import AUTO, finish_views, validation_tta, why_one_view
from .unknown import MAX_STATS_IMAGES, MAX_VAL_IMAGES

# What the planner trades off (measured on CIFAR-10 and hymenoptera, see bench/RESULTS.md):
MIN_FINETUNE_EPOCHS = 3      # epochs (incl. the head's warm-up) below which a probe on cached features wins
MAX_EPOCHS = 30              # beyond this a larger budget buys nothing at the largest useful input
SMALL_DATA = 2000            # up to this many training images, probes are chosen by cross-validation ...
# ... unless the images are small: under this share of the backbone's input side its ImageNet features describe
# them worst, and fine-tuning paid at every size measured (CIFAR-10's 32 px on a 224-px network, 100 to 2,000
# images: +6.6 to +13.4 points over the cross-validated probe, bench/RESULTS.md "Small data: probe or fine-tune")
SMALL_IMAGE_SHARE = 0.5
# ... where this many epochs (incl. the warm-up) fit: the fine-tunes that beat the probe there ran 20-30 epochs
# (80 to 2,000 training images, 3 to 63 steps an epoch); shorter ones are not measured on small data
SMALL_DATA_MIN_EPOCHS = 10
# the measurements behind the choice, as a plan's reason cites them (bench/RESULTS.md "Small data: probe or fine-tune")
SMALL_FINETUNE = "CIFAR-10 at 32 px, 100 to 2,000 images: +6.6 to +13.4 points"
PHOTO_PROBE = "hymenoptera, 196 images, 5 folds: 0.984 against 0.939 for the planned fine-tune in 3 minutes"
MAX_UPSCALE = 4              # inputs beyond 4x the images' own size add cost, not detail
SAFETY = 0.06                # share of the budget kept for what no probe sees (imports, disk)
FINISH_FIXED_S = 12.0        # report: galleries, Grad-CAM, plots (measured 6-10 s)
# the unknown-score's fit (training/unknown.py): the images it reads, and its selection per image
UNKNOWN_TRAIN_IMAGES, UNKNOWN_VAL_IMAGES = MAX_STATS_IMAGES, MAX_VAL_IMAGES
# beyond its views and decoding: the taps of two feature sources and the selection's fits. CIFAR-10 at 96 px with
# flip-zoom (15-minute runs, AVX512-BF16): 4,096 + 5,000 images took 78-100 s while the fit read the val images
# again (at 0.001 s an image the finish was projected 24 s short, and a run trained to its deadline took 15m23s of
# its 15 minutes; 0.004 covered it). Since the finish's val pass gives it the val features: 41-49 s, of which the
# training images' views by the probe's inference speed 26-33 s, so 1.7 ms an image beyond them (runs M and N,
# bench/RESULTS.md "Frozen bottom layers, and one val pass"). The candidate mahalanobis-normed added 5.5 s to the
# selection on 4,096 + 4,800 cached features (7.0 -> 12.5 s, one quiet machine): 2.3 ms an image; a third as much
# again for the machine's moving speed
UNKNOWN_OVERHEAD_S_PER_IMAGE = 0.003
SIZE_STEPS = (32, 48, 64, 96, 128, 160, 192, 224, 256, 288)
# a pretrained network fine-tuned below this side sees its last stage's map shrink to one pixel (ImageNet
# backbones stride 32): on CIFAR-10 in 15 min on an AVX2 CPU, fine-tuning at 32 px (1.5 epochs before the
# deadline) scored 0.7368 on the held-out carve, the linear probe at 128 px 0.7883; sizes below are for probes
MIN_FINETUNE_SIDE = 48
# the fine-tuning recipe of a planned run (measured on CIFAR-10 at 64-128 px, see bench/RESULTS.md):
# BatchNorm keeps its ImageNet statistics (the head warmed up on features computed with them, and
# batch statistics of 32 upscaled images moved the features away: 62% vs 79% after two epochs),
# the body at a third of the head's LR after a short warm-up (AdamW's first steps are large).
FINETUNE_RECIPE = {"lr_mult": 3.0, "warmup_epochs": 0.3, "bn_stats": "frozen"}
# the frozen warm-up fits its head on the cached features of about this many training images (or this many per
# class, where that is more), each class in its share: the head only starts the fine-tune, and every image's
# features cost a forward pass (CIFAR-10 in 15 minutes: 32,000 images' took 104 s of the run's 890, for a head at
# 0.767 val accuracy; 5,000 images' 27-36 s, for one at 0.731; see bench/RESULTS.md "Overheads of a budgeted run")
WARMUP_IMAGES, WARMUP_IMAGES_PER_CLASS = 5000, 20


def warmup_images(n_train: int, num_classes: int) -> int:
    """How many of ``n_train`` training images the frozen warm-up's features are computed for.

    Example:
        >>> warmup_images(800, 2), warmup_images(40000, 10), warmup_images(400000, 1000)
        (800, 5000, 20000)
    """
    return min(n_train, max(WARMUP_IMAGES, WARMUP_IMAGES_PER_CLASS * num_classes))
# the options a plan decides (config keys), unless the user gave them
PLANNED_OPTIONS = ("strategy", "img_size", "epochs", "max_steps", "freeze_epochs", "augment", "resize_mode", "head",
                   "lr_mult", "warmup_epochs", "bn_stats", "ema", "tta", "mixup", "precision", "model", "optimizer",
                   "lr", "weight_decay", "momentum", "batch_size", "label_smoothing")
# the budget of a run given neither --time nor --epochs: long enough for the measured recipes to pay
# (CIFAR-10's 40,000 images: 92% at 60 min on a 2-core CPU), and a small set of photos' plan ends in seconds
DEFAULT_TIME = "1h"
MIN_PARTIAL_EPOCH = 0.1  # a last, partial epoch shorter than this share of an epoch is not worth its validation
# a run that continues a trained model (--weights RUN) fine-tunes at the largest size, up to the model's own,
# where this many passes over its data fit: its network already answers these classes, so a fresh fine-tune's
# minimum (MIN_FINETUNE_EPOCHS, the head's warm-up included) does not apply. Measured with the self-training
# student (CIFAR-10, 800 labelled + 23,000-27,000 pseudo-labelled images, 14-16 minutes, an AVX2 CPU, 2,000
# held-out images): 1.3 passes at the teacher's 128 px 0.8300, 1.6 passes at 96 px 0.8375, 2.1 passes at 96 px
# 0.8425 and 0.8300 (two runs), and the probe on the teacher's features, which the fresh fine-tune's minimum
# chose, 0.8260 (the teachers 0.8125-0.8195; bench/RESULTS.md "Unlabelled images")
MIN_CONTINUED_PASSES = 1.5
# expected held-out accuracy after E fine-tuning epochs (after the head's warm-up): ceiling - slope / E (CIFAR-10,
# 32,000-35,000 training images; EfficientNet-Lite0 by input side), as a planned run predicts (--tta auto's
# flip-zoom): 96 px through 1.5 and 2.35 epochs, 0.8955 and 0.9031 (bench/RESULTS.md "Progressive resizing", runs E2
# and D; the earlier 0.075 slope through one 3.3-epoch point of an older recipe, 0.895, expected 0.868 of the first),
# 128 px through 2 and 5.85 epochs, 0.9102 and 0.9255 ("Test-time augmentation" and "Accuracy against budget"); 64 px
# 4 epochs 0.871 with one view ("Time budgets"; the slope assumed). training/lowres_plan.py weighs them against each
# other and the compact networks' curves; the planner itself weighs only an epoch's share against test-time
# augmentation
FINETUNE_CURVE = {64: (0.890, 0.075), 96: (0.9165, 0.0315), 128: (0.9335, 0.0465)}
# the smallest held-out gain of --tta auto's flip-zoom on a planned fine-tune (CIFAR-10: +0.32 points at 60 min,
# +0.62 at 30, +0.80 at 15; bench/RESULTS.md "Test-time augmentation"): where the epochs the measurement's time
# would take cost less than this by FINETUNE_CURVE, the plan sets that time aside (the run keeps its size)
TTA_GAIN = 0.003


def finetune_curve(side: int) -> tuple[float, float]:
    """(ceiling, slope) of :data:`FINETUNE_CURVE` at the measured side nearest ``side``.

    Example:
        >>> finetune_curve(112), finetune_curve(224)
        ((0.9165, 0.0315), (0.9335, 0.0465))
    """
    return FINETUNE_CURVE[min(FINETUNE_CURVE, key=lambda s: abs(s - side))]
# Progressive resizing (--early-size/--early-steps: the first steps at a smaller side) is the user's lever, never
# planned: on CIFAR-10 in 15 minutes (an AVX512-BF16 CPU, 10,000 held-out images; bench/RESULTS.md "Progressive
# resizing") 1,500-1,640 steps at 64 px then 950-1,093 at 96 scored 0.8867-0.8885, where 2,347 steps all at 96 px
# scored 0.9031 the same day and ~1,530 (a run cut at its deadline) 0.8946: a 64-px step costs 0.45-0.53 of a
# 96-px one and bought less than that share of its accuracy
# Such a run at a size below the model's own measures --tta auto in time set aside before its passes are counted,
# where MIN_CONTINUED_PASSES still fit with it (a fresh plan measures it in the time after its last whole epoch, or
# takes it from that epoch where TTA_GAIN says so): flip-zoom's second view is enlarged toward the size the network
# was trained at. On the students' 200 val images it gained 1.5, 3.0 and 2.0 points (0.795 -> 0.81, 0.795 -> 0.825,
# 0.80 -> 0.82; held-out 0.8300 -> 0.8460 for the last, whose plan had left it out; bench/RESULTS.md "Unlabelled
# images"), against 0.6-0.8 held-out points for fresh fine-tunes ("Test-time augmentation").


def run_budget(cfg: TrainConfig) -> float | None:
    """Seconds the run's plan may take, or None for the fixed recipe: ``--time`` when given
    (``none``: no budget); else :data:`DEFAULT_TIME`, unless ``--epochs`` fixes the run's length
    or the run is resumed (a resumed run continues its own, already planned, epochs).

    Example:
        >>> [run_budget(TrainConfig.from_dict({"data": "d", **given}))
        ...  for given in ({}, {"epochs": 3}, {"time": "none"}, {"time": "20m", "epochs": 3})]
        [3600.0, None, None, 1200.0]
    """
    value = cfg.runtime.time
    if cfg.runtime.resume or no_budget(value):
        return None
    if value is None:
        return None if "epochs" in cfg.given else parse_duration(DEFAULT_TIME)
    return parse_duration(value)


def parse_duration(text: str) -> float:
    """Seconds in ``1h30m``, ``20m``, ``2h``, ``90s`` (a unit is required), from 30 s to 30 days.

    The config's check of ``time`` is this same rule (:func:`~visiontune.training.config.duration_seconds`):
    a value the config accepted always parses here. Raises :class:`ConfigError` naming the form.
    """
    return duration_seconds(text)


def format_duration(seconds: float) -> str:
    """``1h05m``, ``12m30s``, ``45s``."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


@dataclass
class Throughput:
    """Images per second this machine trains (forward, backward, step) and infers at ``size``, at
    ``precision`` (the faster measured; empty: the one ``--precision`` resolves to)."""

    size: int
    train: float
    infer: float
    precision: str = ""


@dataclass(frozen=True)
class Facts:
    """Everything a plan depends on: the budget, the data's statistics and what was measured here.

    Attributes:
        budget: seconds the whole command may take.
        n_train, n_val, n_test: images per split.
        native_side: the training images' median side (px).
        default_side: the backbone's own input side (px).
        throughputs: :func:`measure_throughput` at the candidate sizes.
        elapsed: seconds of the budget spent before planning (from the clock start the caller passed).
        decode_s: seconds to read and decode one image (:func:`decode_seconds`).
        batch_size: images per optimizer step and process.
        processes: training processes (``--devices`` x ``--num-nodes``); each takes its share of every epoch.
        in_memory: whether the images fit in memory for fine-tuning (decoded once); if not, every epoch
            reads and decodes them again, and each epoch pays for it.
        num_classes: classes of the data (a small-data probe's cross-validation fits one model per class).
        unknown: whether the run ends by fitting an unknown-score (``--no-unknown``: not), which the
            finish pays for (:func:`unknown_seconds`).
        single_label: whether the data is single-label (with a val split, a planned fine-tune then
            measures ``--tta auto``: :func:`~visiontune.training.tta_choice.why_one_view`).
        zoom: whether the network takes the zoomed view ``--tta auto`` measures (a ViT's fixed position
            embeddings do not: :func:`~visiontune.models.tta.takes_zoom`).
        trained_side: the input side of the trained model the run continues (``--weights RUN``), else
            ``None``: the plan fine-tunes where :data:`MIN_CONTINUED_PASSES` fit, at most at that side.
        min_passes: a fresh fine-tune's minimum in passes over the data after the head's warm-up, the
            last one partial, instead of :data:`MIN_FINETUNE_EPOCHS` whole epochs (``None``); what
            :func:`~visiontune.training.lowres_plan.finetune_plans` asks of each size it weighs.
    """

    budget: float
    n_train: int
    n_val: int
    native_side: int
    default_side: int
    throughputs: list[Throughput]
    elapsed: float = 0.0
    n_test: int = 0
    decode_s: float = 0.0
    batch_size: int = 32
    processes: int = 1
    in_memory: bool = True
    num_classes: int = 2
    unknown: bool = True
    single_label: bool = True
    zoom: bool = True
    trained_side: int | None = None
    min_passes: float | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch of each process (the loader pads the last process's share)."""
        return math.ceil(math.ceil(self.n_train / self.processes) / self.batch_size)


PRECISION_NAMES = {"32": "fp32", "bf16": "bf16", "16": "fp16", "bf16-dense": "bf16 dense layers"}

# options a plan never sets but honours: each of these needs a head trained epoch by epoch in the loop
LOOP_OPTIONS = ("ema", "early_stopping", "checkpoint_every_steps")
# ... and a batch size the tuner finds after planning: steps per epoch unknown, so whole epochs only;
# a teacher, which needs the network trained on images (a head on cached features never sees one), and the
# pretrained network's bottom groups kept frozen in a fine-tune
HONOURED = (*LOOP_OPTIONS, "auto_batch_size", "teacher", "freeze_bottom")


def fine_tunes(fixed: dict[str, Any], processes: int = 1) -> bool:
    """Whether the user's options need a fine-tune of the network on images, the strategy left to the
    plan: several processes, a teacher, or ``--freeze-bottom``."""
    return processes > 1 or bool(fixed.get("teacher")) or bool(fixed.get("freeze_bottom"))


def fixed_options(cfg: TrainConfig) -> dict[str, Any]:
    """The planned options the user gave (on the command line, in YAML or as keywords), which a plan
    keeps, and those of :data:`HONOURED` the user gave, which it honours. A given ``--precision auto``
    is not among them: it asks for the precision the plan measures fastest, as leaving it out does."""
    return {k: v for k, v in cfg.given_options().items()
            if (k in PLANNED_OPTIONS or k in HONOURED) and (k, v) != ("precision", "auto")}


@dataclass
class Plan:
    """What a time budget buys: the options to override and the projected time of each phase."""

    budget: float
    strategy: str
    img_size: int
    epochs: int
    freeze_epochs: int
    augment: str
    resize_mode: str
    projected: dict[str, float]
    head: str = "linear"
    max_steps: int | None = None  # the fine-tuning's optimizer steps when its last epoch is partial
    recipe: dict[str, Any] = field(default_factory=dict)  # the other options the plan sets (lr_mult, ema, ...)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    throughputs: list[dict[str, float]] = field(default_factory=list)
    reason: str = ""
    val_pass_s: float = 0.0  # one validation pass: a deadline stop mid-epoch still validates that epoch

    @property
    def total(self) -> float:
        return sum(self.projected.values())

    def apply(self, cfg: TrainConfig) -> TrainConfig:
        """``cfg`` with the planned options, except those the user gave (:func:`fixed_options`)."""
        planned = {"strategy": self.strategy, "img_size": self.img_size, "epochs": self.epochs,
                   "freeze_epochs": self.freeze_epochs, "augment": self.augment, "resize_mode": self.resize_mode,
                   "head": self.head, "max_steps": self.max_steps, **self.recipe}
        if "epochs" in cfg.given:  # the user's epochs run whole
            planned.pop("max_steps")
        fixed = fixed_options(cfg)
        return cfg.replace(**{k: v for k, v in planned.items() if k not in fixed})

    def describe(self) -> str:
        phases = ", ".join(f"{k} {format_duration(v)}" for k, v in self.projected.items() if v > 0)
        sizes = "; ".join((f"{t['model']} " if t.get("model") else "") + f"{int(t['size'])} px"
                          + (f" {PRECISION_NAMES.get(t.get('precision'), t.get('precision'))}"
                             if t.get("precision") else "") + ": "
                          + (f"train {t['train']:.0f} img/s, " if t["train"] else "")
                          + f"infer {t['infer']:.0f} img/s" for t in self.throughputs)
        length = (f"{self.epochs} epoch(s)" if self.max_steps is None else
                  f"{self.epochs - 1} epoch(s) and a partial one ({self.max_steps} steps in all after the warm-up)")
        what = (f"linear probe ({self.head} head)" if self.strategy == "linear-probe"
                else f"{self.strategy} for {length}, augment {self.augment}")
        recipe = ", ".join(f"{k} {v}" for k, v in self.recipe.items())
        return (f"time budget {format_duration(self.budget)}: {what} at {self.img_size} px"
                + (f" ({recipe})" if recipe else "") + f"; projected {format_duration(self.total)} "
                f"({phases})\n  measured here: {sizes}\n  why: {self.reason}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        """A plan read back from ``plan.json`` (a file in a run dir: each field is type-checked).

        Raises:
            ValueError: naming the first field that is missing or of the wrong type.
        """
        if not isinstance(data, dict):
            raise ValueError("a plan is a JSON object")
        kinds = {"budget": (int, float), "strategy": str, "img_size": int, "epochs": int, "freeze_epochs": int,
                 "augment": str, "resize_mode": str, "projected": dict, "head": str, "max_steps": (int, type(None)),
                 "recipe": dict, "candidates": list, "throughputs": list, "reason": str, "val_pass_s": (int, float)}
        for key, kind in kinds.items():
            if key not in data or isinstance(data[key], bool) or not isinstance(data[key], kind):
                raise ValueError(f"plan field {key!r} is missing or not {kind}")
        if not all(k in PLANNED_OPTIONS for k in data["recipe"]):
            raise ValueError("plan recipe names an option a plan does not set")
        if not all(isinstance(v, (int, float)) for v in data["projected"].values()):
            raise ValueError("plan field 'projected' holds a non-number")
        return cls(**{key: data[key] for key in kinds})


def candidate_sizes(native_side: int, default_side: int) -> list[int]:
    """Input sizes worth measuring: from the images' own size (at least 32) up to the backbone's
    default, and no more than :data:`MAX_UPSCALE` times the images' size."""
    low = max(32, min(native_side, default_side))
    high = min(default_side, max(low, native_side * MAX_UPSCALE))
    sizes = [s for s in SIZE_STEPS if low <= s <= high]
    if default_side <= high and default_side not in sizes:
        sizes.append(default_side)
    return sorted(set(sizes or [low]))


def _sync() -> None:
    if torch.cuda.is_available():  # GPU work is asynchronous: time what it did, not what was queued
        torch.cuda.synchronize()


def _step_images_per_second(run, batch: int, seconds: float) -> float:
    """Images per second of ``run``, timed as :func:`side_by_side` times one step of several."""
    return side_by_side({"step": run}, batch, seconds)["step"]


def precisions_to_measure(precision: str, size: int) -> list[str]:
    """The precisions worth measuring at ``size``: with ``--precision auto`` on a CPU with native bf16
    (AVX512-BF16, AMX) fp32 and bf16, whose order of speed depends on the network and the input size
    (EfficientNet-Lite0: fp32 faster below ~160 px; a plain 3x3-conv CNN at 32 px: bf16 1.8x faster),
    then bf16-dense against the faster where that is fp32 (:func:`measure_throughput`); else the one
    precision ``--precision`` resolves to."""
    if precision == "auto" and device() == "cpu" and cpu_supports_bf16():
        return ["32", "bf16", "bf16-dense"]
    return [resolve_precision(precision, size, TRAIN_PRECISIONS)]


def side_by_side(steps: dict[str, Callable[[], None]], batch: int, seconds: float) -> dict[str, float]:
    """Images per second of each of ``steps`` (each precision's step on the same batch), their steps
    alternated for about ``seconds`` each (at least two) after a warm-up of each, so that a drift of
    the machine's speed falls on all alike: precisions 5-10% apart (bf16-dense against fp32) are told apart."""
    spent, steps_run = dict.fromkeys(steps, 0.0), dict.fromkeys(steps, 0)
    for run in steps.values():
        run()  # warm-up: first calls allocate and pick kernels
    _sync()
    while min(steps_run.values()) < 2 or min(spent.values()) < seconds:
        for name, run in steps.items():
            start = time.perf_counter()
            run()
            _sync()
            spent[name] += time.perf_counter() - start
            steps_run[name] += 1
    return {name: batch * steps_run[name] / max(spent[name], 1e-9) for name in steps}


def measure_throughput(model: nn.Module, sizes: list[int], precision: str, batch_size: int, seconds: float = 1.5,
                       train: bool = True, frozen: Collection[str] = ()) -> list[Throughput]:
    """Measure training and inference images/s of ``model`` at each size (on a copy: nothing in
    the model changes), in the faster of :func:`precisions_to_measure` (fp32 and bf16 ranked by a quick
    probe of two steps each, then measured in full; where fp32 is the faster, it and bf16-dense
    measured :func:`side_by_side`). About ``3 * seconds`` per size (``4 * seconds`` side by side); without ``train``,
    inference only (a probe on cached features trains no network: its training speed is reported
    as 0), in the one precision ``precision`` resolves to: a probe extracts features once from at
    most a few thousand images, so ranking precisions (a second or so) would cost about what it could
    save (hymenoptera's default run: 1.2 s slower, mean of 3, with the ranking). ``frozen``: names of
    parameters that stay frozen in training (``--freeze-bottom``), frozen in the copy too."""
    net = copy.deepcopy(model).to(device(), memory_format=torch.channels_last)  # where training will run
    for name, p in net.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    opt = make_optimizer(net.parameters(), OptimizerSettings(lr=0.0))  # as training makes it (fused AdamW)
    out: list[Throughput] = []

    def train_step(prec: str, size: int, batch: int = batch_size):
        return _TrainStep(net, opt, prec, batch, size)

    def infer_step(prec: str, size: int):
        return _InferStep(net, prec, 2 * batch_size, size)

    for size in sizes:
        fit_input_size(net, size, size)  # ViTs are built for one input size
        precisions = (precisions_to_measure(precision, size) if train
                      else [resolve_precision(precision, size, TRAIN_PRECISIONS)])
        quick = max(2, batch_size // 4)
        # a few training steps of a quarter batch rank fp32 and bf16 (they differ by 1.5-2x, beyond the
        # probe's noise); the full measurement is of the faster only, so bf16 costs about a second
        whole = [p for p in precisions if p != "bf16-dense"] or precisions
        prec = (max(whole, key=lambda p: _step_images_per_second(train_step(p, size, quick), quick, 0.0))
                if len(whole) > 1 else whole[0])
        if not train:
            trains = 0.0
        elif prec == "32" and "bf16-dense" in precisions:
            # bf16-dense gains 5-10% over fp32, and only at a full batch: measured side by side there
            rates = side_by_side({p: train_step(p, size) for p in ("32", "bf16-dense")}, batch_size, seconds)
            prec = max(rates, key=rates.__getitem__)
            trains = rates[prec]
        else:
            trains = _step_images_per_second(train_step(prec, size), batch_size, seconds)
        infer = _step_images_per_second(infer_step(prec, size), 2 * batch_size, seconds / 2)
        out.append(Throughput(size, trains, infer, prec))
    return out


class _TrainStep:
    """One forward, backward and optimizer step on a random batch (zero LR: weights stay);
    ``frozen_norms``: BatchNorm in eval mode, as a fine-tune with ``--bn-stats frozen`` trains."""

    def __init__(self, net: nn.Module, opt, precision: str, batch: int, size: int, frozen_norms: bool = False):
        self.net, self.opt, self.precision, self.frozen_norms = net, opt, precision, frozen_norms
        self.x = torch.randn(batch, 3, size, size, device=device()).contiguous(memory_format=torch.channels_last)

    def __call__(self) -> None:
        self.net.train()
        if self.frozen_norms:
            for m in self.net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        with train_autocast(self.precision, device()):
            loss = self.net(self.x).float().logsumexp(1).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


class _InferStep:
    def __init__(self, net: nn.Module, precision: str, batch: int, size: int):
        self.net, self.precision = net, precision
        self.x = torch.randn(batch, 3, size, size, device=device()).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self) -> None:
        self.net.eval()
        with autocast(self.precision, device()):
            self.net(self.x)


def decode_seconds(paths: list[str], spec: Preprocessing, sample: int = 24) -> float:
    """Seconds this machine takes to read, decode and resize one of ``paths`` (median of a sample)."""
    step = max(1, len(paths) // sample)
    times = []
    for path in paths[::step][:sample]:
        start = time.perf_counter()
        image = try_load(path, spec.draft_size())
        if image is None:
            continue
        resize(image, spec)
        times.append(time.perf_counter() - start)
    return float(sorted(times)[len(times) // 2]) if times else 0.0


def epoch_seconds(size: Throughput, n_train: int, n_val: int, tta: str | None = None, decode_s: float = 0.0) -> float:
    """One fine-tuning epoch at ``size``: a training pass and a validation pass (with ``--tta``'s views:
    :func:`~visiontune.training.tta_choice.validation_tta`), and ``decode_s`` per image read from disk
    (0 when the images are held in memory)."""
    views = view_cost(validation_tta(tta), size.size)
    return n_train / size.train + views * n_val / size.infer + (n_train + n_val) * decode_s


def unknown_seconds(size: Throughput, n_train: int, n_val: int, decode_s: float = 0.0, tta: str | None = None) -> float:
    """The unknown-score's fit at the end of a run (:mod:`visiontune.training.unknown`): features of
    up to its share of the training images, and the selection's fits on them and on up to its share
    of the val images (:data:`UNKNOWN_OVERHEAD_S_PER_IMAGE`), whose features the finish's val pass
    has read already (a val split larger than that share: the fit reads its share again)."""
    train, val = min(n_train, UNKNOWN_TRAIN_IMAGES), min(n_val, UNKNOWN_VAL_IMAGES)
    again = val if n_val > UNKNOWN_VAL_IMAGES else 0
    return (train + again) * (finish_views(tta, size.size) / size.infer + decode_s) + (
        train + val) * UNKNOWN_OVERHEAD_S_PER_IMAGE


def phase_costs(size: Throughput, n_train: int, n_val: int, n_test: int, epochs: int, warmup_epochs: int,
                finetune: bool, decode_s: float = 0.0, tta: str | None = None, in_memory: bool = True,
                unknown: bool = True, num_classes: int = 0) -> dict[str, float]:
    """Projected seconds of each phase at one input size.

    ``decode_s``: seconds to read and decode one image (measured); ``tta``: ``--tta`` (the views of
    each validation pass, and of the finish's: :func:`~visiontune.training.tta_choice.finish_views`).
    Fine-tuning decodes the images into memory once (``load``), or, when they
    do not fit (``in_memory`` False), again in every epoch. ``unknown``: the finish fits the
    unknown-score (:func:`unknown_seconds`). A fine-tune's warm-up computes the features of
    :func:`warmup_images` of its ``num_classes`` classes' training images, a probe those of all.
    """
    views = finish_views(tta, size.size)
    load = (n_train + n_val) * decode_s if finetune and epochs > warmup_epochs and in_memory else 0.0
    featured = warmup_images(n_train, num_classes) if finetune else n_train
    features = (featured + n_val) * (1 / size.infer + decode_s) if (warmup_epochs or not finetune) else 0.0
    train = ((epochs - warmup_epochs) * epoch_seconds(size, n_train, n_val, tta, 0.0 if in_memory else decode_s)
             if finetune else 0.0)  # a probe's measurements have no training speed
    # one pass over each split (the val logits serve calibration, the thresholds and the report too; until
    # b50bc5b this counted two over val, and projected 130-186 s where runs measured 57-127 s)
    finish = (n_val + n_test) * (views / size.infer + decode_s) + FINISH_FIXED_S
    if unknown and n_val:  # without val images there is no threshold to set, and no fit
        finish += unknown_seconds(size, n_train, n_val, decode_s, tta)
    return {"load": load, "features": features, "train": train, "finish": finish}


def small_images(native_side: int, default_side: int) -> bool:
    """Whether images of median side ``native_side`` are much smaller than the backbone's input
    (under :data:`SMALL_IMAGE_SHARE` of ``default_side``): they are upscaled several times, get the
    small-image recipe when fine-tuned, and on small data a fine-tune is weighed against the probe.

    Example:
        >>> small_images(32, 224), small_images(500, 224), small_images(112, 224)
        (True, False, False)
    """
    return native_side < default_side * SMALL_IMAGE_SHARE


def probes_small_data(n_train: int, fixed: dict[str, Any], processes: int = 1) -> bool:
    """Whether a plan for ``n_train`` images may be the cross-validated probe on cached features (up to
    :data:`SMALL_DATA` images, unless the user fixed another strategy, the epochs or several
    processes). :func:`probe_only` says whether a fine-tune is weighed beside it."""
    strategy = fixed.get("strategy", "finetune" if fine_tunes(fixed, processes) else None)
    return n_train <= SMALL_DATA and strategy in (None, "linear-probe") and "epochs" not in fixed


def probe_only(n_train: int, native_side: int, default_side: int, sizes: list[int], fixed: dict[str, Any],
               processes: int = 1, trained_side: int | None = None) -> bool:
    """Whether the plan is the cross-validated probe without weighing a fine-tune, so that measuring
    the inference speed at one size is all it needs: small data (:func:`probes_small_data`) of
    photo-sized images, or of small ones (:func:`small_images`) that no candidate size in ``sizes``
    fine-tunes (none reaches :data:`MIN_FINETUNE_SIDE`, nor is ``trained_side``, the size of a trained
    model the run continues), or with ``--strategy linear-probe``.

    Example:
        >>> probe_only(800, 500, 224, [160, 192, 224], {}), probe_only(800, 32, 224, [48, 64, 96, 128], {})
        (True, False)
        >>> probe_only(800, 8, 224, [32], {}), probe_only(800, 32, 224, [64], {"strategy": "linear-probe"})
        (True, True)
    """
    if not probes_small_data(n_train, fixed, processes):
        return False
    weighs = ("strategy" not in fixed and small_images(native_side, default_side)
              and any(s >= MIN_FINETUNE_SIDE or s == trained_side for s in sizes))
    return not weighs


def probe_side(sizes: list[int], default_side: int) -> int:
    """The input side of a small-data probe: the largest of ``sizes`` up to the backbone's own side
    (else the largest there is)."""
    return max((s for s in sizes if s <= default_side), default=max(sizes))


def measured_precision(t: Throughput, fixed: dict[str, Any]) -> dict[str, str]:
    """The plan's precision: the fastest measured at the chosen size, unless the user fixed one."""
    return {"precision": t.precision} if t.precision and "precision" not in fixed else {}


def plan_run(facts: Facts, fixed: dict[str, Any] | None = None) -> Plan:
    """The run that fits ``facts.budget`` seconds (``facts.elapsed`` of them already spent): a pure
    function of its arguments, so the same facts always give the same plan.

    ``fixed`` (:func:`fixed_options`) holds the options the user gave (``strategy``, ``img_size``, ``epochs``,
    ``freeze_epochs``, ``augment``, ``resize_mode``, ``head`` and the recipe's keys); the plan
    keeps them and fills in the rest:

    - up to :data:`SMALL_DATA` training images of photo size (:func:`probe_only`): a probe on features
      cached at the backbone's input size, chosen by repeated k-fold cross-validation (``head auto``);
      of small images (:func:`small_images`), the fine-tune below where :data:`SMALL_DATA_MIN_EPOCHS`
      fit, else that probe;
    - else fine-tuning at the largest measured size (at most :data:`MAX_UPSCALE` times the
      images' own) where at least :data:`MIN_FINETUNE_EPOCHS` epochs fit, for as many epochs as
      fit (at most :data:`MAX_EPOCHS`), with :data:`FINETUNE_RECIPE` and, for images much smaller
      than the backbone's input, the small-image recipe (squash to the input, pad-and-crop + flip);
    - else a linear probe on features cached at the largest size whose extraction fits.

    A run that continues a trained model (``facts.trained_side``) fine-tunes at the largest size up
    to the model's own where :data:`MIN_CONTINUED_PASSES` passes over the data fit, the last one
    partial, instead of where :data:`MIN_FINETUNE_EPOCHS` whole epochs do; so does a fresh run
    where ``facts.min_passes`` fit (:func:`~visiontune.training.lowres_plan.finetune_plans` weighs
    each size so).
    """
    fixed = dict(fixed or {})
    budget, n_train, n_val, n_test = facts.budget, facts.n_train, facts.n_val, facts.n_test
    native_side, default_side, throughputs = facts.native_side, facts.default_side, facts.throughputs
    elapsed, decode_s = facts.elapsed, facts.decode_s
    available = budget * (1 - SAFETY) - elapsed
    sizes = sorted(throughputs, key=lambda t: t.size)
    if "img_size" in fixed:
        near = min(sizes, key=lambda t: abs(t.size - fixed["img_size"]))
        sizes = [Throughput(fixed["img_size"], near.train, near.infer, near.precision)]
    elif facts.trained_side is not None:  # a trained model continues at its own size or a smaller one
        sizes = [t for t in sizes if t.size <= facts.trained_side] or sizes[:1]
    small = small_images(native_side, default_side)
    augment = fixed.get("augment", "crop-flip" if small else "standard")
    resize_mode = fixed.get("resize_mode", "squash" if small else "crop")
    strategy = fixed.get("strategy")
    scratch = strategy == "scratch"  # random init: no ImageNet statistics to keep, no features to warm up on
    recipe = {} if scratch else {k: v for k, v in FINETUNE_RECIPE.items() if k not in fixed}
    # --tta auto (training/tta_choice.py) is planned into the time after the last whole epoch: it gained
    # 0.3-0.8 points on held-out images, less than an input size or the minimum of epochs buys (CIFAR-10 on a
    # slower day: 96 px kept its 3 epochs only without it, and 64 px expects 1.9 points less). Two exceptions: a
    # plan of more epochs than its minimum takes the time from its last epoch where FINETUNE_CURVE says that
    # share costs less than TTA_GAIN, and a trained model continuing below its own size (MIN_CONTINUED_PASSES)
    auto_measures = facts.zoom and not why_one_view(facts.single_label, facts.n_val)
    may_measure = "tta" not in fixed and not scratch and auto_measures
    tta = fixed.get("tta")
    if tta == AUTO and not auto_measures:
        tta = None  # the user's auto keeps one view on this data or network: no second view to pay for
    warmup = 0 if scratch else fixed.get("freeze_epochs", 1)
    measured = [asdict(x) for x in throughputs]

    in_memory = facts.in_memory
    reread = 0.0 if in_memory else decode_s  # seconds per image each epoch reads from disk

    def costs(t: Throughput, epochs: int, finetune: bool, views: str | None = None) -> dict[str, float]:
        """The phases at ``t``, with ``--tta`` as planned so far (``views``: another setting)."""
        return {"start": elapsed, **phase_costs(t, n_train, n_val, n_test, epochs, min(warmup, epochs) if finetune
                                                 else 0, finetune, decode_s, views or tta, in_memory, facts.unknown,
                                                 facts.num_classes)}

    # several processes train the network on images (a head on cached features is one process's job)
    if fine_tunes(fixed, facts.processes) and strategy is None:
        strategy = "finetune"

    def cross_validated_probe(why: str) -> Plan:
        """Small data's probe on features cached at the backbone's size (or the largest measured below
        it); ``why``: the plan's reason, before what the probe is."""
        side = probe_side([x.size for x in sizes], default_side)
        t = next(x for x in sizes if x.size == side)
        # an averaged head (--ema), early stopping and step checkpoints need epochs of gradient steps: the
        # scikit-learn heads of "auto" refuse them
        head = fixed.get("head", "linear" if any(fixed.get(k) for k in LOOP_OPTIONS) else "auto")
        epochs = 10 if head == "linear" else 1  # only the gradient head trains for epochs (on cached features)
        projected = {**costs(t, epochs, False),
                     "selection": selection_seconds(n_train, facts.num_classes) if head == "auto" else 0.0}
        reason = f"{why}: probes on cached features, chosen by repeated k-fold cross-validation"
        return Plan(budget, "linear-probe", t.size, epochs, 0, "none", fixed.get("resize_mode", "crop"), projected,
                    head=head, recipe=measured_precision(t, fixed), throughputs=measured, reason=reason)

    small_data = probes_small_data(n_train, fixed, facts.processes)
    if probe_only(n_train, native_side, default_side, [x.size for x in sizes], fixed, facts.processes,
                  facts.trained_side):
        if "strategy" in fixed:
            why = f"--strategy linear-probe on {n_train} training images"
        elif small and "img_size" in fixed:
            why = (f"{n_train} training images at --img-size {fixed['img_size']}, under {MIN_FINETUNE_SIDE} px, below "
                   "which small data is not fine-tuned")
        elif small:
            why = (f"{n_train} training images of {native_side} px: no measured input reaches {MIN_FINETUNE_SIDE} px, "
                   "below which a pretrained network is not fine-tuned")
        else:
            why = (f"{n_train} training images of median side {native_side} px, at least half the backbone's "
                   f"{default_side} px: on such photos the probe beat fine-tuning ({PHOTO_PROBE})")
        return cross_validated_probe(why)

    candidates, best, room_at, passes_at = [], None, {}, {}
    # with --epochs given, the largest size where those epochs fit; else where the minimum does
    needed = fixed["epochs"] - min(warmup, fixed["epochs"]) if "epochs" in fixed else (
        SMALL_DATA_MIN_EPOCHS if small_data else MIN_FINETUNE_EPOCHS) - 1  # the warm-up's epoch counts
    continued = (facts.trained_side is not None and not {"epochs", "img_size"} & fixed.keys()
                 and strategy in (None, "finetune"))
    # the caller's minimum in passes (the last partial), for a fresh run of no given length
    min_passes = facts.min_passes if not continued and not {"epochs", "max_steps"} & fixed.keys() else None

    reserved: set[int] = set()  # sizes where --tta auto's time is set aside before the passes are counted

    def partial_pass(t: Throughput, leftover: float) -> tuple[float, float, float]:
        """(the share of a training pass at ``t`` that ``leftover`` seconds after the last whole epoch buy,
        its validation paid; that pass's seconds; the validation's)."""
        train_s = n_train * (1 / t.train + reread)
        val_s = view_cost(validation_tta(tta), t.size) * n_val / t.infer + n_val * reread
        return (leftover - val_s) / train_s, train_s, val_s

    def room_for(t: Throughput, views: str | None) -> tuple[float, float]:
        """(seconds for fine-tuning epochs at ``t``, seconds per epoch), the finish paid with ``views``."""
        base = costs(t, warmup, True, views)  # ``available`` has already paid for the start
        per_epoch = epoch_seconds(t, n_train, n_val, tta, reread)
        return available - base["features"] - base["finish"] - (n_train + n_val) * (decode_s - reread), per_epoch

    for t in sizes:
        room, per_epoch = room_for(t, None)
        if continued and may_measure and t.size < facts.trained_side:
            # below its own size a trained model measures --tta auto in time set aside for it (see
            # MIN_CONTINUED_PASSES), where the passes it needs still fit; else as any run, in what is left over
            with_tta, _ = room_for(t, AUTO)
            if with_tta / per_epoch >= MIN_CONTINUED_PASSES:
                room = with_tta
                reserved.add(t.size)
        trained = max(0, int(room // per_epoch))  # fine-tuning epochs after the warm-up
        fit = trained + warmup
        room_at[t.size] = (fit, room - trained * per_epoch)
        passes_at[t.size] = room / per_epoch
        candidates.append({"size": t.size, "epochs_that_fit": fit, "seconds_per_epoch": round(per_epoch, 1)})
        if t.size < MIN_FINETUNE_SIDE and not scratch and "img_size" not in fixed and t.size != facts.trained_side:
            continue  # too small to fine-tune a pretrained network (the user's own size is kept, and a trained model's)
        if min_passes is not None:  # whole epochs and the partial one's training steps
            passes_at[t.size] = trained + max(0.0, partial_pass(t, room - trained * per_epoch)[0])
        if (passes_at[t.size] >= MIN_CONTINUED_PASSES if continued else passes_at[t.size] >= min_passes
                if min_passes is not None else trained >= needed):
            best = (t, fit, room - trained * per_epoch)  # sizes ascend: the last that fits is the largest

    def worth_a_share(side: int, trained: int, leftover: float, extra: float, per_epoch: float) -> bool:
        """Whether ``extra`` seconds taken from ``trained`` fine-tuning epochs of ``per_epoch`` seconds
        (``leftover`` seconds after them) cost less accuracy than :data:`TTA_GAIN`, by the slope of
        :func:`finetune_curve` at ``side``."""
        now = trained + max(0.0, leftover) / per_epoch  # epochs, the partial one's share included
        after = now - extra / per_epoch
        return after > 0 and finetune_curve(side)[1] * (1 / after - 1 / now) < TTA_GAIN

    reason, why_finetune = "", ""
    if continued and best is not None:
        t = best[0]
        reason = (f"a trained model continues: time for {passes_at[t.size]:.1f} passes over the data at {t.size} px, "
                  f"the largest input up to its {facts.trained_side} px where at least {MIN_CONTINUED_PASSES} fit "
                  f"({candidates[sizes.index(t)]['seconds_per_epoch']} s per epoch)")
        small_data = False  # its network already answers these classes: the small-data minimum is a fresh one's
    if small_data:  # small images: the fine-tune where one fits, else the probe
        if best is None and continued:
            return cross_validated_probe(f"a trained model continues on {n_train} training images: not even "
                                         f"{MIN_CONTINUED_PASSES} passes fit at any measured size")
        if best is None:
            return cross_validated_probe(f"{n_train} training images of {native_side} px: fewer than "
                                         f"{SMALL_DATA_MIN_EPOCHS} fine-tuning epochs fit at {MIN_FINETUNE_SIDE} px "
                                         "or more (the fine-tunes measured to beat the probe on small data ran 20-30)")
        why_finetune = (f"{n_train} training images of {native_side} px, under {SMALL_IMAGE_SHARE:.0%} of the "
                        f"backbone's {default_side} px: fine-tuning beats probes on frozen features there "
                        f"({SMALL_FINETUNE}); ")
    if best is None and strategy is not None and strategy != "linear-probe":
        # the fixed strategy at the smallest size: the epochs that fit there and a partial one (time for 1.3
        # epochs: one and 0.3 of another, the LR schedule ending at its last step), or one epoch stopped at
        # the deadline where not even that fits
        fit, leftover = room_at[sizes[0].size]
        best = (sizes[0], fit, leftover) if fit > warmup else (sizes[0], fixed.get("epochs", warmup + 1), 0.0)
        why = (f"--strategy {strategy}" if "strategy" in fixed
               else f"{facts.processes} processes train on images" if facts.processes > 1
               else "--teacher distils on images" if fixed.get("teacher")
               else f"--freeze-bottom {fixed.get('freeze_bottom')} fine-tunes the rest")
        want = f"{MIN_CONTINUED_PASSES} passes of the trained model" if continued else f"{needed} fine-tuning epoch(s)"
        reason = (f"{why}: not even {want} fit at any measured size; at the smallest, "
                  + (f"{fit} epoch(s)" if fit > warmup else "one epoch, stopped at the deadline"))
    if best is not None and strategy in (None, "finetune", "progressive", "scratch"):
        t, fit, leftover = best
        epochs = fixed.get("epochs", max(min(fit, MAX_EPOCHS), warmup + 1))
        capped = epochs != fit
        per_epoch = epoch_seconds(t, n_train, n_val, tta, reread)  # auto validates with one view, as unset does
        if epochs < fit:  # capped at MAX_EPOCHS, or fewer given: the epochs that fit but do not run are left over too
            leftover += (fit - max(epochs, warmup)) * per_epoch
        per_epoch_s = candidates[sizes.index(t)]['seconds_per_epoch']
        if not reason and min_passes is not None:
            reason = (f"{passes_at[t.size]:.1f} passes over the data fit at {t.size} px after the head's warm-up, "
                      f"at least {min_passes} wanted ({per_epoch_s} s per epoch)")
        reason = why_finetune + (reason or (f"{fit} epochs fit at {t.size} px, the largest input where at least "
                                            f"{needed + warmup} do ({per_epoch_s} s per epoch)"))
        def keeps_minimum(whole: int, left: float) -> bool:
            """Whether ``whole`` fine-tuning epochs and ``left`` seconds after them still make the plan's minimum."""
            if min_passes is None:
                return whole >= needed
            return whole + max(0.0, partial_pass(t, left)[0]) >= min_passes

        if may_measure:
            extra = costs(t, epochs, True, AUTO)["finish"] - costs(t, epochs, True)["finish"]
            if t.size in reserved:  # its time was set aside before the passes were counted
                recipe["tta"] = tta = AUTO
                reason += (f"; test-time augmentation measured at the end ({extra:.0f} s, set aside: the second view "
                           f"is enlarged toward the model's own {facts.trained_side} px)")
            elif leftover >= extra and (min_passes is None or keeps_minimum(epochs - warmup, leftover - extra)):
                recipe["tta"] = tta = AUTO
                leftover -= extra
                reason += f"; test-time augmentation measured at the end ({extra:.0f} s)"
            elif (leftover < extra <= leftover + per_epoch and not capped and not continued and "max_steps" not in fixed
                  and epochs - 1 - warmup >= 1 and keeps_minimum(epochs - 1 - warmup, leftover + per_epoch - extra)
                  and worth_a_share(t.size, epochs - warmup, leftover, extra, per_epoch)):
                recipe["tta"] = tta = AUTO
                epochs, leftover = epochs - 1, leftover + per_epoch - extra
                reason += (f"; test-time augmentation measured at the end ({extra:.0f} s, taken from the last epoch: "
                           f"by the measured curves it gains more than that share of an epoch)")
            elif leftover >= extra and min_passes is not None:  # it fits, but would leave fewer passes than wanted
                reason += (f"; test-time augmentation not measured: its {extra:.0f} s would leave fewer than "
                           f"{min_passes} passes")
            else:
                reason += f"; no room after the last whole epoch to measure test-time augmentation ({extra:.0f} s)"
        projected = costs(t, epochs, True)
        # the time after the last whole epoch buys a partial one: its share of the training pass, then
        # its validation; the LR schedule ends at its last step (--max-steps)
        share, train_s, val_s = partial_pass(t, leftover)
        max_steps = None
        whole_only = ("epochs" in fixed or "max_steps" in fixed or fixed.get("auto_batch_size") or capped
                      or fit >= MAX_EPOCHS)
        if not whole_only and share >= MIN_PARTIAL_EPOCH:
            whole = epochs - min(warmup, epochs)
            max_steps = whole * facts.steps_per_epoch + int(share * facts.steps_per_epoch)
            epochs += 1
            projected = {**projected, "train": projected["train"] + share * train_s + val_s}
            reason += f", and {share:.2f} of one more"
        return Plan(budget, strategy or "finetune", t.size, epochs, min(warmup, epochs), augment, resize_mode,
                    projected, max_steps=max_steps, recipe={**recipe, **measured_precision(t, fixed)},
                    candidates=candidates, throughputs=measured,
                    reason=reason, val_pass_s=val_s)
    # a probe on cached features: the largest size whose one forward pass over the data fits
    fits = [t for t in sizes if sum(costs(t, 1, False).values()) <= budget * (1 - SAFETY)]
    t = fits[-1] if fits else sizes[0]
    epochs = fixed.get("epochs", 10)
    short = (f"fewer than {MIN_CONTINUED_PASSES} passes of the trained model's fine-tune" if continued
             else f"fewer than {MIN_FINETUNE_EPOCHS} fine-tuning epochs")
    reason = (f"{short} fit at any measured size; a linear probe on features cached at {t.size} px fits"
              if strategy is None else f"--strategy {strategy}")
    return Plan(budget, strategy or "linear-probe", t.size, epochs, 0, "none", resize_mode, costs(t, epochs, False),
                head=fixed.get("head", "linear"), recipe=measured_precision(t, fixed), candidates=candidates,
                throughputs=measured, reason=reason)


# a run shorter than this (training images x epochs) is not worth a probe before it starts
FORECAST_MIN_IMAGE_EPOCHS = 50_000


def forecast(throughput: Throughput, n_train: int, n_val: int, n_test: int, epochs: int, warmup_epochs: int,
             finetune: bool, elapsed: float, tta: str | None = None, num_classes: int = 0) -> tuple[float, str]:
    """(projected seconds, a line saying so) for a run configured without ``--time`` (``tta``: its
    ``--tta``, whose views every validation pass and the finish pay for)."""
    costs = {"start": elapsed, **phase_costs(throughput, n_train, n_val, n_test, epochs, warmup_epochs, finetune,
                                             tta=tta, num_classes=num_classes)}
    total = sum(costs.values())
    epoch = epoch_seconds(throughput, n_train, n_val, tta)
    line = (f"projected: {format_duration(total)} for the whole run ("
            + (f"{epochs - warmup_epochs} epoch(s) of {format_duration(epoch)}" if finetune else "features")
            + f", measured here at {throughput.size} px: train {throughput.train:.0f} img/s, "
            f"inference {throughput.infer:.0f} img/s)")
    if total > 3600:
        line += "; that is over an hour: --time 1h (or any budget) plans a run that fits"
    return total, line


class Deadline(Callback):
    """Stop training at ``deadline`` (epoch seconds) minus the time the finish needs.

    Checked after every batch, once a model has been saved (``has_model``): the best epoch so far
    is kept, so a stop loses at most the epoch in progress, and a run never ends without a model.
    In a multi-process run the processes agree each step (the first one due stops them all).
    """

    def __init__(self, deadline: float, reserve: float, has_model=lambda: True, epoch_offset: int = 0):
        self.stop_at = deadline - reserve
        self.has_model = has_model
        self.epoch_offset = epoch_offset
        self.stopped = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.stopped:
            return
        due = time.time() >= self.stop_at and self.has_model()
        if trainer.world_size > 1:  # all processes stop at the same step (when any is due), or the rest wait forever
            due = bool(trainer.strategy.reduce_boolean_decision(due, all=False))
        if due:
            self.stopped = True
            trainer.should_stop = True
            epoch = trainer.current_epoch + self.epoch_offset + 1
            print(f"time budget: stopping in epoch {epoch} to leave time for the evaluation and the report (the "
                  "best epoch so far is kept)", flush=True)


# a re-plan keeps this share of the time left unplanned: an epoch's speed varies by a few percent
REPLAN_MARGIN = 0.03
# ... and changes the length only by more than this share of it (and a tenth of an epoch): on small data
# an epoch's seconds vary by 20% on 2 shared cores, and each change moves the LR schedule
REPLAN_MIN_CHANGE = 0.1


def steps_that_fit(done: int, steps_per_epoch: int, step_s: float, val_s: float, left: float,
                   max_epochs: int) -> int:
    """Optimizer steps of a fit (``done`` of them run, at an epoch's end) that end within ``left``
    seconds, at ``step_s`` per step and ``val_s`` per validation, in at most ``max_epochs`` epochs.

    Every epoch ends with a validation; the last one's is already reserved by the deadline (it
    validates whatever epoch it stops), so ``left`` pays for the others. A last epoch shorter than
    :data:`MIN_PARTIAL_EPOCH` is dropped: its validation would cost more than its steps buy.

    Example:
        >>> steps_that_fit(done=100, steps_per_epoch=100, step_s=1.0, val_s=20.0, left=260.0, max_epochs=30)
        320
        >>> steps_that_fit(done=100, steps_per_epoch=100, step_s=1.0, val_s=20.0, left=125.0, max_epochs=30)
        200
    """
    first = done // steps_per_epoch
    best = done
    for epoch in range(first + 1, max_epochs + 1):
        room = left - (epoch - first - 1) * val_s
        steps = min(epoch * steps_per_epoch, done + int(room / step_s)) if room > 0 else 0
        if steps - (epoch - 1) * steps_per_epoch < MIN_PARTIAL_EPOCH * steps_per_epoch:
            break
        best = steps
        if steps < epoch * steps_per_epoch:
            break
    return best


class Replan(Callback):
    """Re-plan the run's length from its own speed, after each whole epoch on images.

    The plan's step count came from a few seconds of measurement before training; the loop's real
    speed differs (augmentation, validation, a warm or busy machine: 62-69 img/s against a probe's
    58 on CIFAR-10, so a planned hour ended at 78%). After each epoch the steps that fit before the
    deadline are projected from the mean training and validation seconds of its whole epochs so far
    (:func:`steps_that_fit`, keeping :data:`REPLAN_MARGIN` of the time left), and when they differ
    from the current length by more than :data:`REPLAN_MIN_CHANGE` of it and a tenth of an epoch
    (timing noise must not move the schedule back and forth), the length changes: the step limit,
    the trainer's epochs and steps, and the LR schedule (``set_length``), which then ends at the
    new last step. ``on_change(epochs, max_steps)`` records it (the run's config, for ``--resume``).
    Rank 0 measures and decides; every process applies the same length.

    ``early``: ``(steps, cost)``, the first steps trained at ``--early-size`` and what one of them
    costs against a step at the run's size (:func:`early_step_cost`): the speed is projected per
    step at the run's size, and the early steps still to come are counted at their own cost. A new
    length keeps the early steps' share of it (those still to come: the module's ``early`` and the
    recorded config follow), so a shortened run still ends at its own size.
    """

    def __init__(self, deadline: Deadline, limit, max_epochs: int, on_change, margin: float = REPLAN_MARGIN,
                 early: tuple[int, float] = (0, 1.0)):
        self.deadline, self.limit, self.max_epochs = deadline, limit, max_epochs
        self.on_change, self.margin = on_change, margin
        self.early_steps, self.early_cost = early
        self._start = self._val_start = 0.0
        self._train_s = self._val_s = 0.0
        # (training, validation) seconds of each whole epoch, and its steps counted at the run's size
        self.epochs: list[tuple[float, float, float]] = []
        self.changes: list[tuple[int, int]] = []  # (old steps, new steps)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._train_s, self._val_s = time.perf_counter(), 0.0, 0.0

    def _early_for(self, steps: int, current: int, done: int) -> int:
        """The early steps of a fit of ``steps`` (was ``current``; ``done`` run): their share of the
        length, once the early phase is not over (it never restarts, nor ends before ``done``)."""
        if done >= self.early_steps:
            return self.early_steps
        return max(done, round(self.early_steps * steps / current))

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # (``trainer.training`` is False while a fit validates)
            self._val_start = time.perf_counter()
            self._train_s = self._val_start - self._start

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._val_s = time.perf_counter() - self._val_start

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        spe = int(trainer.num_training_batches) if math.isfinite(trainer.num_training_batches) else 0
        done = trainer.global_step
        current = self.limit.max_steps if self.limit.max_steps > 0 else trainer.max_epochs * spe
        whole = spe > 0 and done % spe == 0 and self._train_s > 0 and not trainer.should_stop
        steps, train_s, val_s = current, 0.0, 0.0
        if whole and trainer.global_rank == 0:
            early_in = min(spe, max(0, self.early_steps - (done - spe)))  # early steps in this epoch
            self.epochs.append((self._train_s, self._val_s, spe - early_in * (1 - self.early_cost)))
            train_s, val_s, units = (sum(x) / len(self.epochs) for x in zip(*self.epochs))
            step_s = train_s / units  # a step at the run's size
            left = (self.deadline.stop_at - time.time()) * (1 - self.margin)
            early = self.early_steps
            for _ in range(2):  # the cheaper early steps to come depend on the new length, and it on them
                credit = max(0, early - done) * (1 - self.early_cost) * step_s
                steps = steps_that_fit(done, spe, step_s, val_s, left + credit, self.max_epochs)
                early = self._early_for(steps, current, done)
            if abs(steps - current) <= max(MIN_PARTIAL_EPOCH * spe, REPLAN_MIN_CHANGE * current) or steps <= done:
                steps = current
        if trainer.world_size > 1:
            steps = trainer.strategy.broadcast(steps, src=0)
        if steps == current:
            return
        self.changes.append((current, steps))
        self.limit.max_steps = steps
        trainer.fit_loop.epoch_loop.max_steps = steps
        trainer.fit_loop.max_epochs = math.ceil(steps / spe)
        pl_module.set_length(steps, spe)
        self.early_steps = self._early_for(steps, current, done)
        if getattr(pl_module, "early", None):
            pl_module.early = (pl_module.early[0], self.early_steps)
        epochs, partial = self.on_change(steps, spe)
        if trainer.global_rank == 0:
            last = " (the last partial)" if partial else ""  # rank 0 measured train_s and val_s above
            print(f"re-plan: an epoch takes {format_duration(train_s)} of training and "
                  f"{format_duration(val_s)} of validation, so the run now ends after {epochs} epoch(s){last}: "
                  f"{steps} steps on images, was {current}", flush=True)


def early_step_cost(plan: Plan | None, early_size: int | None, size: int) -> float:
    """What a training step at ``early_size`` costs against one at ``size``, by ``plan``'s
    measurements (1.0 where it has none: without a plan, or no early size).

    Example:
        >>> speeds = [{"size": 64, "train": 228.0, "infer": 987.0}, {"size": 96, "train": 102.0, "infer": 444.0}]
        >>> plan = Plan(900, "finetune", 96, 4, 1, "crop-flip", "squash", {}, throughputs=speeds)
        >>> round(early_step_cost(plan, 64, 96), 3), early_step_cost(None, 64, 96)
        (0.447, 1.0)
    """
    speeds = {int(t["size"]): float(t["train"]) for t in (plan.throughputs if plan else []) if not t.get("model")}
    if early_size in speeds and speeds[early_size] > 0 and speeds.get(size, 0) > 0:
        return speeds[size] / speeds[early_size]
    return 1.0


class Forecast(Callback):
    """Print the projected duration of the run once ``after_s`` seconds of training are timed."""

    def __init__(self, total_epochs: int, epoch_offset: int, n_val: int, finish_s: float, hint: bool,
                 after_s: float = 20.0, min_batches: int = 5):
        self.total_epochs, self.epoch_offset, self.n_val = total_epochs, epoch_offset, n_val
        self.finish_s, self.hint, self.after_s, self.min_batches = finish_s, hint, after_s, min_batches
        self.done = False
        self.start: float | None = None
        self.batches = 0
        self.projection: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.start is None and batch_idx >= 1:  # the first batch pays for kernel selection
            self.start = time.perf_counter()
            self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.done or self.start is None:
            return
        self.batches += 1
        spent = time.perf_counter() - self.start
        if self.batches < self.min_batches or spent < self.after_s:
            return
        self.done = True
        per_batch = spent / self.batches
        batches = trainer.num_training_batches if math.isfinite(trainer.num_training_batches) else self.batches
        images_per_second = len(batch[1]) / per_batch
        per_epoch = batches * per_batch + self.n_val / (3 * images_per_second)  # inference ~3x a train step
        epochs_left = trainer.max_epochs - trainer.current_epoch
        remaining = epochs_left * per_epoch - (batch_idx + 1) * per_batch + self.finish_s
        self.projection = remaining
        line = (f"projected: {format_duration(remaining)} more for {epochs_left} epoch(s) of "
                f"{format_duration(per_epoch)} and the final evaluation")
        if self.hint and remaining > 3600:
            line += "; that is over an hour: --time 1h (or any budget) plans a run that fits"
        print(line, flush=True)
