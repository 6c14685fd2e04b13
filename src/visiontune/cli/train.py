"""``visiontune train``, ``lr-find`` and ``compare``: flags into :class:`TrainConfig`, then the API."""

from __future__ import annotations

import argparse

from ..core.errors import ConfigError
from ..training.config import OPTIONS
from .common import add_train_options, config_from_args

# lr-find sweeps the LR of one short fit: no epochs, schedule, selection, checkpoints or report
LR_FIND_KEYS = ("data", "val", "val_fraction", "augment", "balance", "cache_images", "workers",
                "model", "weights", "img_size", "resize_mode", "lr_mult", "bn_stats",
                "batch_size", "optimizer", "weight_decay", "momentum", "label_smoothing",
                "seed", "precision", "run_dir", "compile")
# compare trains each (model, strategy) in turn, in this process, into its own output folder
COMPARE_EXCLUDED = ("strategy", "model", "resume", "report", "devices", "num_nodes", "distributed")


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a pretrained classifier on a folder of images",
                       description="Fine-tune a pretrained classifier on a folder of images.")
    add_train_options(p, OPTIONS, "train")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("lr-find", help="learning-rate range test: plot loss vs LR and suggest --lr",
                       description="Learning-rate range test on a new run dir (runs/lr-find-N).")
    add_train_options(p, LR_FIND_KEYS, "lr-find")
    p.add_argument("--steps", type=int, default=100, metavar="N", help="optimizer steps in the sweep (100)")
    p.set_defaults(func=cmd_lr_find)

    p = sub.add_parser("compare", help="train several strategies/models on the same split and seed; one table",
                       description="Train every (model, strategy) on the same split and seed; one table "
                                   "(OUT/compare.csv). --run-dir is the output folder (default runs/compare-N).")
    add_train_options(p, [k for k in OPTIONS if k not in COMPARE_EXCLUDED], "compare")
    p.add_argument("--strategies", default="finetune,linear-probe,progressive", metavar="A,B",
                   help="comma-separated strategies (finetune,linear-probe,progressive)")
    p.add_argument("--models", default="efficientnet_lite0", metavar="A,B",
                   help="comma-separated models (efficientnet_lite0)")
    p.set_defaults(func=cmd_compare)


def cmd_train(args: argparse.Namespace) -> int:
    from ..core.hardware import is_rank_zero  # lazy: the parser builds without torch
    from ..pipeline.train import run_training

    cfg = config_from_args(args)
    if not cfg.data.path and not cfg.runtime.resume:
        raise ConfigError("give DATA (a folder or a path,label CSV), or --resume RUN_DIR")
    run = run_training(cfg)
    if is_rank_zero():
        print(f"run: {run.run_dir}")
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from ..training.lr_find import lr_find  # lazy: as above

    _, run_dir = lr_find(_with_data(args, "visiontune lr-find DATA"), num_training=args.steps)
    print(f"run: {run_dir}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from ..pipeline.compare import compare, format_table  # lazy: as above

    cfg = _with_data(args, "visiontune compare DATA --strategies finetune,linear-probe")
    given = {k: v for k, v in cfg.items() if k in args.train_keys and v != OPTIONS[k].default}
    run_dir, data = given.pop("run_dir", None), given.pop("data")
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    print(format_table(compare(data, strategies=strategies, models=models, run_dir=run_dir, **given)))
    return 0


def _with_data(args: argparse.Namespace, usage: str):
    cfg = config_from_args(args)
    if not cfg.data.path:
        raise ConfigError(f"give DATA (a folder or a path,label CSV): {usage}")
    return cfg
