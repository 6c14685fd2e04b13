"""Which options each way of training honours: refused by name where they cannot apply, and
named in the run's header where they do.

A run trains in one of three ways: the whole network on images (``finetune``, ``progressive``,
``scratch``), the classifier layer by gradient descent on cached features (``linear-probe``
with ``--head linear``, through the same loop and callbacks), or the classifier layer fitted in
one step by scikit-learn (``--head logistic``, ``svm`` or ``auto``). :data:`LEVERS` declares,
for each option that only some of them honour, who does. :func:`check_options` refuses the
rest before the run dir exists; an option is never silently ignored.

Example:
    >>> from visiontune.training.config import TrainConfig
    >>> cfg = TrainConfig.from_dict({"data": "d", "strategy": "linear-probe", "head": "logistic", "ema": True})
    >>> try:
    ...     check_options(cfg)
    ... except ConfigError as exc:
    ...     print(*str(exc).split("; "), sep="\\n")
    --ema averages the weights over the training steps
    --head logistic fits in one step (scikit-learn): use --head linear or drop --ema
    >>> levers_line(TrainConfig.from_dict({"data": "d", "ema": True, "balance": "sampler"}))
    'levers: EMA, balance sampler'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.errors import ConfigError
from .config import OPTIONS, TrainConfig

IMAGE_STRATEGIES = ("finetune", "progressive", "scratch")  # the whole network, on images
GRADIENT_HEAD = "gradient head"  # linear-probe --head linear: the classifier layer, in the loop
FITTED_HEAD = "fitted head"  # linear-probe --head logistic|svm|auto: one scikit-learn fit
LOOP = frozenset({*IMAGE_STRATEGIES, GRADIENT_HEAD})  # every way trained epoch by epoch
IMAGES = frozenset(IMAGE_STRATEGIES)
WARMED_UP = frozenset({"finetune", "progressive"})  # strategies that start with the frozen warm-up


def way_of(cfg: TrainConfig) -> str:
    """How ``cfg`` trains: a strategy of :data:`IMAGE_STRATEGIES`, :data:`GRADIENT_HEAD` or :data:`FITTED_HEAD`."""
    if cfg.strategy.name != "linear-probe":
        return cfg.strategy.name
    return GRADIENT_HEAD if cfg.strategy.head == "linear" else FITTED_HEAD


def _describe(way: str, cfg: TrainConfig) -> str:
    if way == FITTED_HEAD:
        return f"--head {cfg.strategy.head} fits in one step (scikit-learn)"
    if way == GRADIENT_HEAD:
        return "--strategy linear-probe trains only the classifier layer, on cached features of the unaltered images"
    return {"finetune": "--strategy finetune trains its own classifier layer with the body",
            "scratch": "--strategy scratch trains every layer from random weights, on images",
            "progressive": "--strategy progressive unfreezes layer groups on its own schedule"}.get(
                way, f"--strategy {way}")


@dataclass(frozen=True)
class Lever:
    """An option only some ways of training honour.

    Attributes:
        key: the config key (its flag is ``--key-with-dashes``).
        honoured_by: the ways (:func:`way_of`) that apply it.
        does: what it does, as the refusal says it ("averages the weights over the training steps").
        in_effect: whether a value asks for something (default: it differs from the option's default
            and is not None, False or 0).
    """

    key: str
    honoured_by: frozenset[str]
    does: str
    in_effect: Callable[[Any], bool] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    def asked(self, cfg: TrainConfig) -> bool:
        value = cfg.get(self.key)
        if self.in_effect is not None:
            return self.in_effect(value)
        return value != OPTIONS[self.key].default and value not in (None, False, 0)

    def remedy(self, cfg: TrainConfig) -> str:
        """Which choice would honour the option: another head, else the strategies that do."""
        if cfg.strategy.name == "linear-probe" and GRADIENT_HEAD in self.honoured_by:
            return "use --head linear"
        strategies = [s for s in (*IMAGE_STRATEGIES, "linear-probe")
                      if s in self.honoured_by or (s == "linear-probe" and self.honoured_by & {GRADIENT_HEAD,
                                                                                              FITTED_HEAD})]
        return "use " + " or ".join(f"--strategy {s}" for s in strategies)


#: Every option some way of training cannot honour, and who does honour it.
LEVERS = (
    Lever("ema", LOOP, "averages the weights over the training steps", lambda v: bool(v)),
    Lever("early_stopping", LOOP, "stops when --select-metric has not improved for that many epochs",
          lambda v: v is not None),
    Lever("checkpoint_every_steps", LOOP, "checkpoints every N optimizer steps", lambda v: v is not None),
    Lever("lr", LOOP, "sets the gradient steps' size"),
    Lever("optimizer", LOOP, "chooses the gradient optimizer"),
    Lever("weight_decay", LOOP, "sets the optimizer's weight decay", lambda v: v != OPTIONS["weight_decay"].default),
    Lever("momentum", LOOP, "sets SGD's momentum"),
    Lever("schedule", LOOP, "sets the learning rate's schedule over the epochs"),
    Lever("warmup_epochs", LOOP, "warms the learning rate up over epochs"),
    Lever("mixup", IMAGES, "mixes pairs of training images"),
    Lever("cutmix", IMAGES, "pastes patches between training images"),
    Lever("compile", IMAGES, "compiles the network for training on images"),
    Lever("max_steps", IMAGES, "ends the training on images after that many steps", lambda v: v is not None),
    Lever("early_size", IMAGES, "trains the first steps on images at a smaller input side", lambda v: v is not None),
    Lever("auto_batch_size", IMAGES, "sizes the batches of images to the device's memory"),
    # progressive changes which layers train after DDP has wrapped the network, which would leave a
    # group unfrozen later unsynchronised between the copies
    Lever("devices", IMAGES - {"progressive"}, "trains copies of the network in several processes", lambda v: v > 1),
    Lever("num_nodes", IMAGES - {"progressive"}, "trains copies of the network on several machines",
          lambda v: v > 1),
    Lever("freeze_bottom", frozenset({"finetune"}), "keeps the body's bottom layer groups frozen",
          lambda v: v > 0),
    Lever("unfreeze_every", frozenset({"progressive"}), "sets when progressive unfreezes the next layer group",
          lambda v: v is not None),
    Lever("lr_mult", WARMED_UP, "sets the body's learning rate relative to the head's"),
    Lever("head", frozenset({GRADIENT_HEAD, FITTED_HEAD}), "chooses the head a linear probe fits on cached features"),
    Lever("cached_views", frozenset({*WARMED_UP, GRADIENT_HEAD, FITTED_HEAD}),
          "caches augmented views of the frozen body's features", lambda v: v > 1),
)


def check_options(cfg: TrainConfig, planned: bool = False, remedy: str | None = None) -> None:
    """Refuse, by name and with the remedy, the first option ``cfg`` sets that its way of training
    cannot honour (:data:`LEVERS`). Run before the run dir exists.

    With ``planned`` (a time budget's plan was applied), a strategy or head the plan chose rather
    than the user is named in the refusal, with how to choose otherwise. ``remedy``: what to do
    instead of the option's own remedy (the way of training was not the user's choice).

    Raises:
        ConfigError: ``--ema averages the weights over the training steps; --head logistic fits in
            one step (scikit-learn): use --head linear or drop --ema``.
    """
    way = way_of(cfg)
    chose = [f"--{key} {cfg.get(key)}" for key in ("strategy", "head") if key not in cfg.given
             and (key == "strategy" or cfg.strategy.name == "linear-probe")] if planned else []
    for lever in LEVERS:
        if way not in lever.honoured_by and lever.asked(cfg):
            chosen = (f" (the time budget's plan chose {' '.join(chose)}; give --strategy or --head to choose)"
                      if chose else "")
            raise ConfigError(f"{lever.flag} {lever.does}; {_describe(way, cfg)}{chosen}: "
                              f"{remedy or lever.remedy(cfg)} or drop {lever.flag}")


def levers_line(cfg: TrainConfig) -> str:
    """The header line naming the levers in effect (EMA, mixup/cutmix, TTA, balance, early
    stopping, max steps), or ``levers: none``: what a run applies is visible at its start."""
    o, fitted = cfg.optim, way_of(cfg) == FITTED_HEAD
    tta = cfg.model.tta not in (None, "none")
    parts = (["EMA"] if o.ema else []) + ([f"mixup {o.mixup:g}"] if o.mixup else []) + (
        [f"cutmix {o.cutmix:g}"] if o.cutmix else []) + ([f"TTA ({cfg.model.tta})"] if tta else [])
    if cfg.data.balance != "none":  # a scikit-learn head re-weights the classes in its fit, whichever is asked
        parts.append(f"balance {cfg.data.balance}" + (" (class-weighted fit)" if fitted else ""))
    if o.early_stopping:
        parts.append(f"early stopping (patience {o.early_stopping})")
    if o.max_steps and way_of(cfg) in IMAGES:  # visible: it ends the run before --epochs' last step
        parts.append(f"max steps {o.max_steps}")
    if o.early_size and way_of(cfg) in IMAGES:
        parts.append(f"the first {o.early_steps} steps at {o.early_size} px")
    return "levers: " + (", ".join(parts) or "none")
