"""``visiontune train``, ``lr-find`` and ``compare``: flags into :class:`TrainConfig`, then the API."""

from __future__ import annotations

import argparse

from ..core.errors import ConfigError
from ..training.config import OPTIONS, CompareOptions, LrFindOptions
from .common import add_options, add_train_options, config_from_args, options_from_args


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a pretrained classifier on a folder of images",
                       description="Fine-tune a pretrained classifier on a folder of images.")
    add_train_options(p, OPTIONS, "train")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("lr-find", help="learning-rate range test: plot loss vs LR and suggest --lr",
                       description="Learning-rate range test on a new run dir (runs/lr-find-N).")
    add_train_options(p, LrFindOptions.TRAIN_KEYS, "lr-find")
    add_options(p, LrFindOptions)
    p.set_defaults(func=cmd_lr_find)

    p = sub.add_parser("compare", help="train several strategies/models on the same split and seed; one table",
                       description="Train every (model, strategy) on the same split and seed; one table "
                                   "(OUT/compare.csv). --run-dir is the output folder (default runs/compare-N).")
    add_train_options(p, CompareOptions.TRAIN_KEYS, "compare")
    add_options(p, CompareOptions)
    p.set_defaults(func=cmd_compare)


def cmd_train(args: argparse.Namespace) -> int:
    from ..core.hardware import is_rank_zero, process_started  # lazy: the parser builds without torch
    from ..pipeline.train import run_training

    cfg = config_from_args(args)
    if not cfg.data.path and not cfg.runtime.resume:
        raise ConfigError("give DATA (a folder or a path,label CSV), or --resume RUN_DIR")
    run = run_training(cfg, started=process_started())  # the command's time includes its start-up
    if is_rank_zero():
        print(f"run: {run.run_dir}")
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from ..training.lr_find import lr_find  # lazy: as above

    _, run_dir = lr_find(_with_data(args, "visiontune lr-find DATA"), **options_from_args(args).to_dict())
    print(f"run: {run_dir}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from ..pipeline.compare import compare, format_table  # lazy: as above

    cfg = _with_data(args, "visiontune compare DATA --strategies finetune,linear-probe")
    given = cfg.given_options()  # flags and --config keys as given (--epochs 10 fixes the length, default or not)
    run_dir, data = given.pop("run_dir", None), given.pop("data")
    print(format_table(compare(data, run_dir=run_dir, **options_from_args(args).to_dict(), **given)))
    return 0


def _with_data(args: argparse.Namespace, usage: str):
    cfg = config_from_args(args)
    if not cfg.data.path:
        raise ConfigError(f"give DATA (a folder or a path,label CSV): {usage}")
    return cfg
