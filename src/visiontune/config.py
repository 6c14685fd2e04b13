"""One configuration dataclass for training, shared by the CLI and the Python API.

The CLI only parses flags into :class:`TrainConfig`; ``visiontune.train`` takes the same fields as
keyword arguments. The fully resolved config is written to ``config.yaml`` in every run dir, and
``--config FILE.yaml`` reads one back. Unknown keys fail with a close-match suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

# Allowed values for the choice-valued fields; the strategy/head registries add their own names.
CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("adamw", "adam", "sgd"),
    "schedule": ("cosine", "step", "none"),
    "augment": ("none", "light", "standard", "strong"),
    "precision": ("auto", "32", "bf16", "16"),
    "resize_mode": ("crop", "letterbox", "squash"),
    "logger": ("csv", "tensorboard"),
    "strategy": ("finetune", "linear-probe", "progressive", "scratch"),
    "head": ("linear", "logistic", "svm"),
    "bn_stats": ("train", "frozen"),
    "strategy_dist": ("auto", "ddp", "ddp_spawn"),
    "balance": ("none", "weights", "sampler"),
    "select_metric": ("accuracy", "macro_f1", "balanced_accuracy"),
}


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the remedy."""


@dataclass
class TrainConfig:
    """Every option of ``visiontune train``; see ``visiontune train --help`` for each one."""

    data: str = ""
    val: str | None = None
    val_fraction: float = 0.2
    model: str = "efficientnet_lite0"
    weights: str = "default"
    img_size: int | None = None
    resize_mode: str = "crop"
    strategy: str = "finetune"
    head: str = "linear"
    freeze_epochs: int = 1
    unfreeze_every: int | None = None
    lr_mult: float = 10.0
    bn_stats: str = "train"
    epochs: int = 10
    batch_size: int = 32
    lr: float | None = None
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    step_size: int = 3
    label_smoothing: float = 0.1
    augment: str = "standard"
    early_stopping: int | None = None
    balance: str = "none"
    select_metric: str = "accuracy"
    report: bool = True
    seed: int = 0
    precision: str = "auto"
    workers: int | None = None
    devices: int = 1
    num_nodes: int = 1
    strategy_dist: str = "auto"
    logger: str = "csv"
    run_dir: str | None = None
    resume: str | None = None
    checkpoint_every_steps: int | None = None
    auto_batch_size: bool = False
    compile: bool = False
    cache_images: bool = False
    cache_dir: str | None = None
    cached_views: int = 1
    limit_train_batches: float | int | None = None
    limit_val_batches: float | int | None = None
    progress: bool | None = None  # None: bars only on an interactive terminal

    def validate(self) -> TrainConfig:
        """Check choice-valued and numeric fields; raise :class:`ConfigError` naming allowed values."""
        for name, allowed in CHOICES.items():
            value = str(getattr(self, name))
            if value not in allowed:
                raise ConfigError(
                    f"{name}={value!r} is not valid; choose one of: {', '.join(allowed)}"
                    + _suggest(value, allowed)
                )
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lr_mult <= 0:
            raise ConfigError(f"lr_mult must be > 0, got {self.lr_mult}")
        if self.freeze_epochs < 0:
            raise ConfigError(f"freeze_epochs must be >= 0, got {self.freeze_epochs}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.img_size is not None and self.img_size < 16:
            raise ConfigError(f"img_size must be >= 16, got {self.img_size}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build a config, failing on unknown keys with the closest valid key suggested."""
        check_keys(values)
        return cls(**values).validate()

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        values = read_yaml(path)
        return cls.from_dict(values)


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def check_keys(values: dict[str, Any]) -> None:
    known = field_names()
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown option {key!r}" + _suggest(key, known, fallback=known))


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of option: value, got {type(values).__name__}")
    return {k.replace("-", "_"): v for k, v in values.items()}


def _suggest(value: str, allowed, fallback=None) -> str:
    allowed = list(allowed)
    close = difflib.get_close_matches(value, allowed, n=1, cutoff=0.6) or difflib.get_close_matches(
        value.replace("-", "_"), allowed, n=1, cutoff=0.6
    )
    if close:
        return f"; did you mean {close[0]!r}?"
    if fallback:
        return f"; valid options are: {', '.join(fallback)}"
    return ""
