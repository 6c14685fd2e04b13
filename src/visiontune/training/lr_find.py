"""``visiontune lr-find``: Lightning's learning-rate range test on your data and model."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L

from ..core.safe_io import save_figure
from ..models.groups import body_groups
from .config import TrainConfig
from .lightning_fit import ImageDataModule, make_module, trainer_precision
from .setup import setup_run

# The sweep's starting body LR relative to the head's (the sweep moves every group together).
SWEEP_BODY_LR = 1e-3


def lr_find(cfg: TrainConfig, steps: int = 100) -> tuple[float | None, Path]:
    """Sweep the learning rate exponentially over ``steps`` optimizer steps with every layer
    trainable (one LR for all layers during the sweep); save ``lr_find.png`` and return
    (suggested head LR, run dir). The run dir is a new ``runs/lr-find-N`` (or ``--run-dir``).

    Example:
        lr, run_dir = lr_find(TrainConfig.from_dict({"data": "data/hymenoptera/train"}))
    """
    from lightning.pytorch.tuner import Tuner  # lazy: only lr-find uses the tuner

    ctx = setup_run(cfg.replace(time="none"), prefix="lr-find")  # a sweep of a few steps: nothing to plan
    groups = [[n for g in body_groups(ctx.model, ctx.arch.classifier) for n in g]]
    module = make_module(ctx, groups, [SWEEP_BODY_LR / cfg.strategy.lr_mult])
    data = ImageDataModule(ctx)
    trainer = L.Trainer(accelerator="auto", devices=1, **trainer_precision(ctx.precision), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=ctx.run_dir)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        finder = Tuner(trainer).lr_find(module, datamodule=data, num_training=steps, update_attr=False)
    suggestion = finder.suggestion() if finder is not None else None
    if finder is not None:
        fig = finder.plot(suggest=True)
        save_figure(fig, ctx.run_dir / "lr_find.png", dpi=100)
    print(f"suggested --lr {suggestion:.3g}" if suggestion else "no clear suggestion: see the plot")
    print(f"plot: {ctx.run_dir / 'lr_find.png'}")
    return suggestion, ctx.run_dir
