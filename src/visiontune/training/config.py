"""``TrainConfig``: every option of ``visiontune train``, in five sections, with flat keys.

Sections group the options by the component that uses them (data, model, strategy,
optimisation, runtime); each option keeps one flat, unique key, which is its CLI flag
(``--val-fraction``), its YAML key (``val_fraction``) and its keyword in ``visiontune.train``.
The help text, type and allowed values of each option live on its field here, so the CLI, the
YAML reader and the Python API cannot disagree. The resolved config is written to
``config.yaml`` in every run dir, and ``--config FILE.yaml`` reads one back; unknown keys fail
with a close-match suggestion.

Example:
    >>> cfg = TrainConfig.from_dict({"data": "photos", "epochs": 3, "strategy": "linear-probe"})
    >>> cfg.data.path, cfg.optim.epochs, cfg.strategy.name
    ('photos', 3, 'linear-probe')
    >>> cfg.to_dict()["epochs"]
    3
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from ..core.errors import ConfigError
from ..core.options import CommandOptions, OptionInfo, check_keys, normalise_keys, option, options_of
from ..core.registry import TRAIN_PRECISIONS
from ..core.safe_io import atomic_write_text
from ..data.registry import AUGMENTS, RESIZE
from ..data.scan import MAX_HELD_OUT, MIN_HELD_OUT_PER_CLASS
from .registry import (
    BALANCE,
    BN_STATS,
    DISTRIBUTED,
    LOGGERS,
    OPTIMIZERS,
    PROBE_HEADS,
    SCHEDULES,
    SELECT_METRICS,
    STRATEGIES,
    TASKS,
    TRAIN_TTA,
)

# a duration for --time: 1h30m, 20m, 2h, 90s (hours, minutes, seconds; each optional), matched
# whole against the stripped text. Spaces only ever precede a number: with a free ``\s*`` between
# optional groups, a run of spaces could be split among them in O(n^4) ways before a mismatch
# (400 spaces and an "x" took 20 s). ASCII digits only: ``\d`` would take every script's digits.
DURATION_PATTERN = r"(?:([0-9]+(?:\.[0-9]+)?)h)?(?:\s*([0-9]+(?:\.[0-9]+)?)m(?:in)?)?(?:\s*([0-9]+(?:\.[0-9]+)?)s)?"
DURATION = re.compile(DURATION_PATTERN)
# a budget under 30 s cannot plan a run (measuring this machine alone takes seconds); one above
# 30 days is a typo, and a number of unbounded length is infinite as a float
MIN_DURATION_S, MAX_DURATION_S = 30.0, 30 * 86400.0
DURATION_FORM = "write it like 20m, 1h30m, 2h or 90s (from 30s to 720h, i.e. 30 days)"

# keys of earlier releases, still read from old config.yaml files
ALIASES = {"strategy_dist": "distributed"}


def no_budget(value: Any) -> bool:
    """Whether a ``--time`` value asks for no budget (``none``): the fixed recipe."""
    return isinstance(value, str) and value.strip().lower() == "none"


def duration_seconds(text: Any) -> float:
    """Seconds in a ``--time`` value (``1h30m``, ``20m``, ``2h``, ``90s``; a unit is required),
    within 30 s to 30 days: the one check of a duration, for the config and the planner alike.

    Raises :class:`ConfigError` naming the accepted form.

    Example:
        >>> duration_seconds("1h30m"), duration_seconds(" 2m 30s ")
        (5400.0, 150.0)
    """
    text = str(text)
    shown = repr(text) if len(text) <= 40 else f"{text[:20]!r}... ({len(text)} characters)"
    match = DURATION.fullmatch(text.strip())
    if not match or not any(match.groups()):
        raise ConfigError(f"--time {shown} is not a duration; {DURATION_FORM}, or none for the fixed recipe")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds  # a 400-digit number is inf here, never an error
    if not math.isfinite(total) or total > MAX_DURATION_S:
        raise ConfigError(f"--time {shown} is longer than the 30-day maximum; {DURATION_FORM}")
    if total < MIN_DURATION_S:
        raise ConfigError(f"--time {shown} is shorter than the 30s minimum: a shorter budget cannot plan a run "
                          "(measuring this machine alone takes seconds); give at least 30s, written like 20m, "
                          "1h30m, 2h or 90s")
    return total


@dataclass
class DataOptions:
    """Where the images are and how they are split, augmented, balanced and loaded."""

    path: str = option("", "DATA/<class>/*, DATA/{train,val[,test]}/<class>/*, or a CSV of path,label / "
                           "path,labels / one-hot rows", key="data")
    task: str = option("auto", "single- or multi-label", choices=TASKS)
    label_delim: str = option(" ", "separator of the labels in one cell of a path,labels CSV (default: a space)")
    val: str | None = option(None, "explicit validation folder or CSV (default: DATA/val, else a stratified split "
                                   "of DATA)", metavar="DIR|CSV")
    unlabeled: str | None = option(None, "a folder of unlabelled images: self-training (a teacher trained on DATA "
                                         "pseudo-labels them, a student trains on both and is kept unless below the "
                                         "teacher on val)",
                                   metavar="DIR")
    val_fraction: float = option(0.2, "share of each class held out for validation when DATA has no val split (0.2, "
                                      f"at most {MAX_HELD_OUT:,} images, or {MIN_HELD_OUT_PER_CLASS} per class, unless "
                                      "given)")
    augment: str = option("standard", "training augmentation", choices=AUGMENTS)
    balance: str = option("none", "class imbalance", choices=BALANCE)
    cache_images: bool | None = option(None, "decode every image once into memory and augment it there, with no "
                                             "loader workers (default: when it fits in a quarter of the free memory)")
    workers: int | None = option(None, "data-loading processes (default: one per core, up to 8)")


@dataclass
class ModelOptions:
    """The backbone, its weights and its input."""

    name: str = option("efficientnet_lite0", "timm name, torchvision:NAME, or the embedded offline default "
                                             "efficientnet_lite0", key="model")
    weights: str = option("default", "default (pretrained: embedded or hub download) | none | PATH to a local "
                                     ".safetensors/.pth | RUN, a visiontune run or model folder of the same "
                                     "classes: it starts the run, its classifier included",
                          metavar="default|none|PATH|RUN")
    img_size: int | None = option(None, "input size in pixels (default: the backbone's pretrained config)")
    resize_mode: str = option("crop", "how images are fitted to the input", choices=RESIZE)
    tta: str | None = option(None, "test-time augmentation, the views every prediction averages (stored in the "
                                   "model card; exports include it). Default: auto in a planned fine-tune of "
                                   "single-label data, else none", choices=TRAIN_TTA)
    unknown: bool = option(True, "fit an unknown-score at the end of training (the best of several, measured on "
                                 "classes held out), by which images of no class the model knows are answered "
                                 "'unknown'")
    threshold_tpr: float = option(0.95, "share of known val images the unknown-score's threshold accepts (0.95)")


@dataclass
class StrategyOptions:
    """How the pretrained network is adapted: what trains when, and at which relative LR."""

    name: str = option("finetune", "transfer-learning strategy", key="strategy", choices=STRATEGIES)
    head: str = option("linear", "linear-probe: the kind of head fitted on the features", choices=PROBE_HEADS)
    freeze_epochs: int = option(1, "epochs training only the head before the body is unfrozen (1)")
    freeze_bottom: int = option(0, "finetune: layer groups at the bottom of the body (the stem first) that stay "
                                   "frozen while the rest trains (0)")
    unfreeze_every: int | None = option(None, "progressive: epochs between unfreezing one more layer group (auto)")
    lr_mult: float = option(10.0, "head LR / body LR for discriminative learning rates (10)")
    bn_stats: str = option("train", "BatchNorm running statistics of trainable layers", choices=BN_STATS)
    cached_views: int = option(1, "augmented views cached per image for frozen-backbone epochs (1: un-augmented)")


@dataclass
class OptimOptions:
    """The optimisation: epochs, batches, optimizer, schedule, loss and model selection."""

    epochs: int = option(10, "training epochs (10)")
    batch_size: int = option(32, "images per batch (32)")
    lr: float | None = option(None, "head learning rate (default: 1e-3 for adam/adamw, 1e-2 for sgd)")
    optimizer: str = option("adamw", "optimizer", choices=OPTIMIZERS)
    weight_decay: float = option(0.01, "weight decay (0.01)")
    momentum: float = option(0.9, "SGD momentum (0.9)")
    schedule: str = option("cosine", "LR schedule, per step, after warm-up", choices=SCHEDULES)
    warmup_epochs: float = option(0.0, "linear LR warm-up, in epochs (0)")
    step_size: int = option(3, "step schedule: epochs between x0.1 decays (3)")
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy loss (0.1; single-label)")
    select_metric: str = option("accuracy", "metric choosing the best epoch (and early stopping)",
                                choices=SELECT_METRICS)
    teacher: str | None = option(None, "distillation: a trained run or model folder (same classes) whose softened "
                                       "probabilities the model also learns from", metavar="RUN_DIR|MODEL")
    distill_alpha: float = option(0.5, "--teacher: weight of the teacher's soft targets in the loss (0.5)")
    distill_temperature: float = option(2.0, "--teacher: softmax temperature of the soft targets (2.0)")
    mixup: float = option(0.0, "mixup alpha (timm Mixup; 0: off)")
    cutmix: float = option(0.0, "cutmix alpha (timm Mixup; 0: off)")
    ema: bool | None = option(None, "validate and keep an exponential moving average of the weights (decay set by "
                                    "the run length). Default: off")
    early_stopping: int | None = option(None, "stop after this many epochs without improvement of --select-metric")
    max_steps: int | None = option(None, "end the training on images after this many optimizer steps, validating "
                                         "there: a last, partial epoch (the LR schedule ends there; a time budget "
                                         "sets it to fill its time). Default: every step of --epochs")
    early_size: int | None = option(None, "progressive resizing: the first --early-steps optimizer steps on images "
                                          "train at this smaller input side, the rest at --img-size (never "
                                          "planned: on CIFAR-10 its cheaper steps bought less than their share of "
                                          "the accuracy). Default: off", metavar="PX")
    early_steps: int | None = option(None, "--early-size: how many of the first optimizer steps on images train "
                                           "at it")
    auto_batch_size: bool = option(False, "find the largest batch size that fits (Lightning tuner; capped at 1/4 "
                                          "of the data)")


@dataclass
class RuntimeOptions:
    """Where and how the run executes: seed, precision, devices, outputs, checkpoints."""

    seed: int = option(0, "random seed for the split, init and data order (0)")
    precision: str = option("auto", "numeric precision", choices=TRAIN_PRECISIONS)
    devices: int = option(1, "devices (GPUs, or CPU processes) per node; >1 trains with DDP (1)")
    num_nodes: int = option(1, "machines in a multi-node run (torchrun / SLURM; see README) (1)")
    distributed: str = option("auto", "distributed strategy", choices=DISTRIBUTED)
    logger: str = option("csv", "training logger, written under RUN/logs", choices=LOGGERS)
    run_dir: str | None = option(None, "where to write the run (default: runs/train-N, never overwriting)",
                                 metavar="PATH")
    resume: str | None = option(None, "continue an interrupted run from its last checkpoint", metavar="RUN_DIR")
    checkpoint_every_steps: int | None = option(
        None, "also checkpoint every N optimizer steps, not at an epoch's last (resume mid-epoch)")
    compile: bool = option(False, "torch.compile the model for training (opt-in: compiling takes minutes)")
    cache_dir: str | None = option(None, "feature cache folder (default: $VISIONTUNE_CACHE or ~/.cache/visiontune)",
                                   metavar="PATH")
    limit_train_batches: float | int | None = option(None, "train on this many batches (int) or share (float) per "
                                                           "epoch; for smoke tests")
    limit_val_batches: float | int | None = option(None, "validate on this many batches (int) or share (float); "
                                                         "for smoke tests")
    progress: bool | None = option(None, "progress bars (default: only on an interactive terminal)")
    report: bool = option(True, "write RUN/report.html at the end")
    time: str | None = option(None, "time budget for the whole command, e.g. 20m, 1h30m (30s to 30 days): "
                                    "visiontune measures this machine, plans strategy, input size and epochs to fit "
                                    "(keeping the options you give) and stops at the deadline. Default: 1h, unless "
                                    "--epochs is given; none: the fixed recipe (--epochs, 10 by default)",
                              metavar="DURATION|none")


SECTIONS = {"data": DataOptions, "model": ModelOptions, "strategy": StrategyOptions, "optim": OptimOptions,
            "runtime": RuntimeOptions}


def options() -> dict[str, OptionInfo]:
    """Every option by flat key, in section order."""
    return {key: info for section, cls in SECTIONS.items() for key, info in options_of(cls, section).items()}


OPTIONS = options()


@dataclass
class TrainConfig:
    """Every option of ``visiontune train``, by section; see :data:`OPTIONS` for the flat keys."""

    data: DataOptions = field(default_factory=DataOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    strategy: StrategyOptions = field(default_factory=StrategyOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    # the keys the user set (flags, YAML, keywords): a time budget plans only the others
    given: frozenset[str] = field(default_factory=frozenset, compare=False, repr=False)

    def get(self, key: str) -> Any:
        """The value of flat key ``key`` (``cfg.get("epochs")``)."""
        info = OPTIONS[key]
        return getattr(getattr(self, info.section), info.attr)

    def items(self) -> Iterator[tuple[str, Any]]:
        for key in OPTIONS:
            yield key, self.get(key)

    def given_options(self) -> dict[str, Any]:
        """The options the user set (flags, YAML, keywords) and their values, whatever the value:
        ``--epochs 10`` is given even though 10 is the default (it fixes the run's length)."""
        return {key: self.get(key) for key in OPTIONS if key in self.given}

    def replace(self, **flat: Any) -> TrainConfig:
        """A validated copy with some flat keys changed (the original is left as it is)."""
        out = TrainConfig.from_dict({**self.to_dict(), **flat})
        out.given = self.given
        return out

    def to_dict(self) -> dict[str, Any]:
        """Flat ``{key: value}`` in section order: what ``config.yaml`` holds."""
        return dict(self.items())

    def validate(self) -> TrainConfig:
        """Check choice-valued and numeric options; raise :class:`ConfigError` naming allowed values."""
        for key, info in OPTIONS.items():
            if info.choices is not None and self.get(key) is not None:  # None: left to visiontune
                info.choices.check(self.get(key))
        checks = [
            ("val_fraction", lambda v: 0.0 < v < 1.0, "must be in (0, 1)"),
            ("epochs", lambda v: v >= 1, "must be >= 1"),
            ("batch_size", lambda v: v >= 1, "must be >= 1"),
            ("lr_mult", lambda v: v > 0, "must be > 0"),
            ("freeze_epochs", lambda v: v >= 0, "must be >= 0"),
            ("freeze_bottom", lambda v: v >= 0, "must be >= 0"),
            ("lr", lambda v: v is None or v > 0, "must be > 0"),
            ("weight_decay", lambda v: v >= 0, "must be >= 0"),
            ("label_smoothing", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
            ("img_size", lambda v: v is None or v >= 16, "must be >= 16"),
            ("cached_views", lambda v: v >= 1, "must be >= 1"),
            ("mixup", lambda v: v >= 0, "must be >= 0"),
            ("distill_alpha", lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
            ("distill_temperature", lambda v: 0.0 < v <= 100.0, "must be in (0, 100]"),
            ("cutmix", lambda v: v >= 0, "must be >= 0"),
            ("devices", lambda v: v >= 1, "must be >= 1"),
            ("max_steps", lambda v: v is None or v >= 1, "must be >= 1"),
            ("early_size", lambda v: v is None or v >= 16, "must be >= 16"),
            ("early_steps", lambda v: v is None or v >= 1, "must be >= 1"),
            ("threshold_tpr", lambda v: 0.5 <= v < 1.0, "must be in [0.5, 1)"),
            ("num_nodes", lambda v: v >= 1, "must be >= 1"),
        ]
        for key, ok, text in checks:
            if not ok(self.get(key)):  # named as its flag (the YAML key and keyword are its spelling with _)
                raise ConfigError(f"--{key.replace('_', '-')} {text}, got {self.get(key)}")
        if (self.get("early_size") is None) != (self.get("early_steps") is None):
            raise ConfigError("--early-size and --early-steps go together: give both (the smaller side and how many "
                              "of the first steps train at it) or neither")
        early, size = self.get("early_size"), self.get("img_size")
        if None not in (early, size) and early >= size:
            raise ConfigError(f"--early-size must be smaller than --img-size, got {early} and {size}")
        if self.get("time") is not None and not no_budget(self.get("time")):  # the planner's rule, bounds included
            duration_seconds(self.get("time"))
        return self

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from flat keys (dashes allowed), failing on unknown keys with the closest suggested."""
        values = normalise_keys(values, ALIASES)
        check_keys(values, OPTIONS)
        if isinstance(values.get("tta"), bool):  # before flip-zoom, --tta was on/off (flip): old configs resume
            values["tta"] = "flip" if values["tta"] else "none"
        sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for key, value in values.items():
            info = OPTIONS[key]
            sections[info.section][info.attr] = value
        try:
            cfg = cls(**{name: SECTIONS[name](**kw) for name, kw in sections.items()}, given=frozenset(values))
        except TypeError as exc:  # a value of an impossible type
            raise ConfigError(str(exc)) from None
        return cfg.validate()

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(read_yaml(path))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of options (dashed keys allowed)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of option: value, got {type(values).__name__}")
    return normalise_keys(values, ALIASES)


__all__ = ["OPTIONS", "ConfigError", "TrainConfig"]


@dataclass
class LrFindOptions(CommandOptions):
    """``visiontune lr-find``'s own options; it also takes the train options in :attr:`TRAIN_KEYS`.

    An LR sweep is one short fit: it has no epochs, schedule, selection, checkpoints or report.
    """

    TRAIN_KEYS: ClassVar[tuple[str, ...]] = (
        "data", "val", "val_fraction", "augment", "balance", "cache_images", "workers", "model", "weights", "img_size",
        "resize_mode", "lr_mult", "bn_stats", "batch_size", "optimizer", "weight_decay", "momentum",
        "label_smoothing", "seed", "precision", "run_dir", "compile")

    steps: int = option(100, "optimizer steps in the sweep (100)", check=(lambda v: v >= 1, "must be >= 1"))


# the train options compare sets itself for each entry, and what to use instead
COMPARE_OWN = {"strategy": "list strategies in --strategies", "model": "list models in --models",
               "resume": "resume an entry with visiontune train --resume OUT/<entry>",
               "report": "compare writes no reports; run visiontune report OUT/<entry>",
               "run_dir": "the output folder is compare(run_dir=...)"}


@dataclass
class CompareOptions(CommandOptions):
    """``visiontune compare``'s own options; it also takes the train options in :attr:`TRAIN_KEYS`
    (``--run-dir`` names its output folder)."""

    # one process trains the entries in turn: no multi-process options either
    TRAIN_KEYS: ClassVar[tuple[str, ...]] = tuple(
        k for k in OPTIONS if k not in {*COMPARE_OWN, "devices", "num_nodes", "distributed"} or k == "run_dir")

    strategies: str = option("finetune,linear-probe,progressive", "comma-separated strategies "
                             "(finetune,linear-probe,progressive)", metavar="A,B")
    models: str = option("efficientnet_lite0", "comma-separated models (efficientnet_lite0)", metavar="A,B")

    def names(self, key: str) -> list[str]:
        """The comma-separated list ``key`` as names."""
        return [n.strip() for n in str(getattr(self, key)).split(",") if n.strip()]
