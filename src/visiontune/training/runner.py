"""``visiontune.train``: data -> model -> strategy -> run dir, with resume."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L

from ..config import ConfigError, TrainConfig
from ..data.scan import Splits, discover, write_skipped, write_split_csv
from ..hardware import is_rank_zero, resolve_precision
from ..models.factory import build_model
from .context import TrainContext
from .strategies import RANDOM_INIT, STRATEGIES



@dataclass
class Run:
    """The result of :func:`train`: where the run lies and how the best model scored."""

    run_dir: Path
    model_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)

    def load(self):
        """The best model as a :class:`visiontune.Classifier`."""
        from ..evaluation.predictor import Classifier

        return Classifier.load(self.model_dir)


def train(data: str | os.PathLike | None = None, **options: Any) -> Run:
    """Fine-tune a pretrained classifier on a folder of labelled images.

    Args:
        data: ``DATA/<class>/*``, ``DATA/{train,val[,test]}/<class>/*`` or a ``path,label`` CSV.
        **options: any :class:`visiontune.config.TrainConfig` field, e.g. ``epochs=5``,
            ``model="resnet50"``, ``strategy="linear-probe"``; ``config="run.yaml"`` reads a file.

    Returns:
        A :class:`Run` with ``run_dir``, ``model_dir`` and the best model's metrics.

    Example:
        >>> import visiontune
        >>> run = visiontune.train("data/hymenoptera/train", epochs=3)  # doctest: +SKIP
        >>> run.metrics["val"]["accuracy"]  # doctest: +SKIP
        0.96
    """
    values: dict[str, Any] = {}
    config_file = options.pop("config", None)
    if config_file:
        from ..config import read_yaml

        values.update(read_yaml(config_file))
    if data is not None:
        values["data"] = str(data)
    values.update(options)
    return run_training(TrainConfig.from_dict(values))


def run_training(cfg: TrainConfig) -> Run:
    ctx = setup_run(cfg)
    STRATEGIES[cfg.strategy](ctx)
    if not is_rank_zero():  # other DDP ranks only train; rank 0 evaluates and writes
        return Run(ctx.run_dir, ctx.model_dir)
    return finish(ctx)


def _distributed_run_dir(cfg: TrainConfig, prefix: str) -> Path:
    """Every rank must write into one run dir.

    Lightning's launcher re-runs this command for ranks > 0 with rank 0's environment, so rank 0
    publishes its run dir in VISIONTUNE_RUN_DIR; under torchrun/SLURM all ranks start at once
    and need an explicit --run-dir.
    """
    inherited = os.environ.get(RUN_DIR_ENV)
    if not is_rank_zero():
        if inherited:
            return Path(inherited)
        if not cfg.run_dir:
            raise ConfigError("multi-process training started by torchrun/SLURM needs an explicit --run-dir")
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        return Path(cfg.run_dir)
    run_dir = make_run_dir(cfg.run_dir, prefix)
    if cfg.devices != 1 or cfg.num_nodes != 1:
        os.environ[RUN_DIR_ENV] = str(run_dir)
    return run_dir


def setup_run(cfg: TrainConfig, prefix: str = "train") -> TrainContext:
    """Run dir, seeded RNGs, checked data splits and the model: everything before training."""
    resume_ckpt = None
    if cfg.resume:
        cfg, run_dir, resume_ckpt = prepare_resume(cfg)
    elif not cfg.data:
        raise ConfigError("no data given: visiontune train DATA (a folder or a path,label CSV)")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    # everything that can fail on user input runs before a run dir exists
    splits = discover(cfg.data, cfg.val, cfg.val_fraction, cfg.seed)
    weights = "none" if cfg.strategy in RANDOM_INIT else cfg.weights
    model, arch, pre = build_model(cfg.model, len(splits.class_names), weights)
    if cfg.img_size:
        pre["input_size"] = [3, cfg.img_size, cfg.img_size]
    pre["resize_mode"] = cfg.resize_mode
    precision = resolve_precision(cfg.precision, pre["input_size"][-1])
    if not cfg.resume:
        run_dir = _distributed_run_dir(cfg, prefix)
    cfg.run_dir = str(run_dir)
    if is_rank_zero():
        report_data(splits, run_dir)
        cfg.save(run_dir / "config.yaml")
    print(f"model: {cfg.model} ({arch.source}:{arch.name}, weights={weights}), strategy {cfg.strategy}, "
          f"input {pre['input_size'][1]}x{pre['input_size'][2]} {pre['resize_mode']}, precision {precision}")
    return TrainContext(cfg, run_dir, model, arch, pre, splits, precision, resume_ckpt)


def finish(ctx: TrainContext) -> Run:
    from ..evaluation.evaluate import evaluate_samples
    from ..evaluation.plots import plot_curves
    from ..evaluation.predictor import Classifier
    from ..models.artifact import save_model

    plot_curves(ctx.run_dir / "metrics.csv", ctx.run_dir / "curves.png")
    clf = Classifier.load(ctx.model_dir)
    metrics: dict[str, Any] = dict(clf.meta.get("metrics", {}))
    for split in ("val", "test"):
        samples = getattr(ctx.splits, split)
        if samples:
            result = evaluate_samples(clf, samples, batch_size=ctx.cfg.batch_size * 2, workers=ctx.cfg.workers)
            metrics[split] = {k: result[k] for k in ("accuracy", "macro_f1", "num_samples") if k in result}
            if "top5_accuracy" in result:
                metrics[split]["top5_accuracy"] = result["top5_accuracy"]
            print(f"{split}: accuracy {result['accuracy']:.4f}  macro_f1 {result['macro_f1']:.4f}  "
                  f"({result['num_samples']} images)")
    save_model(ctx.model_dir, clf.model, {**ctx.model_meta(metrics)})
    report_and_calibrate(ctx)
    return Run(ctx.run_dir, ctx.model_dir, metrics)


def report_and_calibrate(ctx: TrainContext) -> None:
    """Fit temperature scaling on val (stored in model.json) and write RUN/report.html."""
    try:
        if ctx.cfg.report:
            from ..evaluation.report import write_report

            print(f"report: {write_report(ctx.run_dir, workers=ctx.cfg.workers)}")  # also calibrates
        else:
            from ..evaluation.calibration import calibrate_run

            calibrate_run(ctx.run_dir, workers=ctx.cfg.workers)
        cal = json.loads((ctx.model_dir / "model.json").read_text()).get("calibration", {})
        if cal:
            print(f"calibration: temperature {cal['temperature']:.3f}, val ECE {cal['ece_before']:.3f} -> "
                  f"{cal['ece_after']:.3f}")
    except Exception as exc:  # a report problem must never lose a finished training run
        print(f"warning: report/calibration skipped ({type(exc).__name__}: {exc}); "
              f"run `visiontune report {ctx.run_dir}`")


RUN_DIR_ENV = "VISIONTUNE_RUN_DIR"
IMBALANCE_WARNING = 5.0  # max/min class ratio above which training warns


def report_data(splits: Splits, run_dir: Path) -> None:
    write_skipped(splits.skipped, run_dir / "skipped_files.txt")
    (run_dir / "splits").mkdir(exist_ok=True)
    for split in ("train", "val", "test"):
        if getattr(splits, split):
            write_split_csv(getattr(splits, split), splits.class_names, run_dir / "splits" / f"{split}.csv")
    print(f"data: {len(splits.class_names)} classes, {len(splits.train)} train / {len(splits.val)} val"
          + (f" / {len(splits.test)} test" if splits.test else "") + f" images ({splits.layout} layout)")
    counts = [c for c in splits.counts("train").values() if c > 0]
    if counts and max(counts) > IMBALANCE_WARNING * min(counts):
        smallest = sorted(splits.counts("train").items(), key=lambda kv: kv[1])[:3]
        print(f"warning: class imbalance {max(counts)}:{min(counts)} in train (smallest: "
              + ", ".join(f"{n} {c}" for n, c in smallest)
              + "); consider --balance weights or --balance sampler, and --select-metric macro_f1")
    if splits.skipped:
        print(f"skipped {len(splits.skipped)} unreadable file(s), listed in {run_dir / 'skipped_files.txt'}")


def make_run_dir(requested: str | None, prefix: str = "train") -> Path:
    """A new run dir: ``requested`` if empty/new, else the next free ``runs/<prefix>-N``."""
    if requested:
        path = Path(requested)
        if path.exists() and any(path.iterdir()):
            raise ConfigError(f"run dir {path} exists and is not empty; pick another --run-dir or use --resume {path}")
        path.mkdir(parents=True, exist_ok=True)
        return path
    root = Path("runs")
    root.mkdir(exist_ok=True)
    taken = [int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(rf"{prefix}-(\d+)", p.name))]
    number = max(taken, default=0) + 1
    while True:
        path = root / f"{prefix}-{number}"
        try:
            path.mkdir()
            return path
        except FileExistsError:  # a concurrent run took it
            number += 1


def prepare_resume(cfg: TrainConfig) -> tuple[TrainConfig, Path, Path]:
    """Config and newest readable checkpoint of an interrupted run."""
    run_dir = Path(cfg.resume)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there; is it a visiontune run dir?")
    from .checkpoint_io import remove_stale_temp_files

    for stale in remove_stale_temp_files(run_dir / "checkpoints"):  # none when the folder is missing
        print(f"removed half-written {stale.name} (the run was killed while saving it)")
    ckpt = newest_valid_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise ConfigError(f"--resume {run_dir}: no readable checkpoint in {run_dir / 'checkpoints'}; "
                          "start a new run instead")
    resumed = TrainConfig.load(saved)
    resumed.resume = str(run_dir)
    print(f"resuming {run_dir} from {ckpt.name}")
    return resumed, run_dir, ckpt


def newest_valid_checkpoint(folder: Path) -> Path | None:
    """The most recent checkpoint that loads (weights only); a truncated newest one is skipped."""
    import torch

    candidates = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []
    for path in candidates:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return path
        except Exception as exc:  # truncated or corrupt: fall back to the previous one
            print(f"skipping unreadable checkpoint {path.name}: {type(exc).__name__}")
    return None
