"""Before training: run dir, seeded RNGs, checked data splits and the model, or a resumed run.

Everything that can fail on the user's input runs before a run dir exists, so a failed start
leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import replace
from pathlib import Path

from ..core.errors import ConfigError
from ..core.hardware import available_memory, is_rank_zero, process_started, resolve_precision
from ..core.layout import RunLayout
from ..data.memory import should_cache, store_side
from ..data.preprocess import Preprocessing
from ..data.scan import Splits, discover, median_side, write_skipped, write_split_csv
from ..models.factory import build_model, fit_input_size
from .budget import (
    FORECAST_MIN_IMAGE_EPOCHS,
    Plan,
    candidate_sizes,
    decode_seconds,
    forecast,
    format_duration,
    parse_duration,
    plan_run,
    probe,
)
from .checkpoint_io import newest_valid_checkpoint, remove_stale_temp_files
from .config import TrainConfig
from .context import TrainContext
from .registry import LOGGERS, RANDOM_INIT, STRATEGIES

RUN_DIR_ENV = "VISIONTUNE_RUN_DIR"
# what --time decides, unless the user gave it
PLANNED = ("strategy", "img_size", "epochs", "freeze_epochs", "augment", "resize_mode", "head", "lr_mult",
           "warmup_epochs", "bn_stats", "ema", "tta", "mixup")
IMBALANCE_WARNING = 5.0  # max/min class ratio above which training warns


def setup_run(cfg: TrainConfig, prefix: str = "train") -> TrainContext:
    """Run dir, seeded RNGs, checked data splits and the model: everything before training.

    Example:
        ctx = setup_run(TrainConfig.from_dict({"data": "photos", "epochs": 1}))
    """
    import lightning as L  # lazy: Lightning loads only when a run starts (not for --help or errors)

    started = budget_start()
    if cfg.runtime.time and (cfg.runtime.devices > 1 or cfg.runtime.num_nodes > 1):
        # every rank would plan and stop on its own measurements: ranks that disagree block each other
        raise ConfigError("--time plans a single-process run; drop --time or use --devices 1 --num-nodes 1")
    if cfg.runtime.time and cfg.runtime.resume:
        print("time budget: --resume continues the run's own planned epochs; --time applies to new runs only",
              flush=True)
    resume_ckpt = None
    run_dir: Path | None = None
    if cfg.runtime.resume:
        cfg, run_dir, resume_ckpt = prepare_resume(cfg)
    elif not cfg.data.path:
        raise ConfigError("no data given: visiontune train DATA (a folder or a path,label CSV)")
    L.seed_everything(cfg.runtime.seed, workers=True, verbose=False)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    # everything that can fail on user input runs before a run dir exists
    splits = discover(cfg.data.path, cfg.data.val, cfg.data.val_fraction, cfg.runtime.seed,
                      task=cfg.data.task, label_delim=cfg.data.label_delim)
    for note in (splits.task_note, splits.outside_warning()):
        if note:
            print(note, flush=True)
    cfg = adapt_to_task(cfg, splits.task)
    weights = "none" if cfg.strategy.name in RANDOM_INIT else cfg.model.weights
    model, arch, pre = build_model(cfg.model.name, len(splits.class_names), weights)
    default_side = pre.height  # the backbone's own input size
    if cfg.model.img_size:
        pre = pre.with_size(cfg.model.img_size)
    pre = replace(pre, resize_mode=cfg.model.resize_mode)
    plan, deadline = None, None
    if cfg.runtime.time and not cfg.runtime.resume:
        cfg, pre, plan = plan_budget(cfg, model, pre, splits, default_side, started)
        deadline = started + parse_duration(cfg.runtime.time)
    elif not cfg.runtime.resume and len(splits.train) * cfg.optim.epochs >= FORECAST_MIN_IMAGE_EPOCHS:
        finetune = cfg.strategy.name != "linear-probe"
        (measured,) = probe(model, [pre.height], cfg.runtime.precision, cfg.optim.batch_size, seconds=1.0)
        _, line = forecast(measured, len(splits.train), len(splits.val), len(splits.test), cfg.optim.epochs,
                           min(cfg.strategy.freeze_epochs, cfg.optim.epochs) if finetune else 0, finetune,
                           time.time() - started)
        print(line, flush=True)
    fit_input_size(model, pre.height, pre.width)  # ViTs: position embeddings for the chosen size
    precision = resolve_precision(cfg.runtime.precision, pre.height)
    cache, needed = should_cache(cfg.data.cache_images, [p for p, _ in splits.train],
                                 store_side(pre, cfg.data.augment), available_memory())
    if run_dir is None:
        run_dir = _distributed_run_dir(cfg, prefix)
    layout = RunLayout(run_dir)
    if is_rank_zero():
        report_data(splits, layout)
        resolved = cfg.replace(run_dir=str(run_dir))  # the user's cfg is left as given
        resolved.save(layout.config)
        if plan is not None:
            plan.save(layout.plan)
    print(f"model: {cfg.model.name} ({arch.source}:{arch.name}, weights={weights}), strategy {cfg.strategy.name}, "
          f"input {pre.height}x{pre.width} {pre.resize_mode}, precision {precision}"
          + (f", images in memory (~{needed / 2**20:.0f} MiB)" if cache else ""))
    ctx = TrainContext(cfg, layout, model, arch, pre, splits, precision, resume_ckpt, cfg.optim.batch_size, cache,
                       deadline, plan)
    ctx.logger = LOGGERS.get(cfg.runtime.logger)(run_dir, layout.logs, Path(run_dir).name,
                                                 cfg.replace(run_dir=str(run_dir)).to_dict())
    return ctx


def adapt_to_task(cfg: TrainConfig, task: str) -> TrainConfig:
    """Refuse what the task does not support, naming it; multi-label selects by macro mAP unless told."""
    if task == "single":
        if cfg.optim.select_metric == "map":
            raise ConfigError("--select-metric map is for multi-label data; single-label runs take accuracy, "
                              "macro_f1 or balanced_accuracy")
        return cfg
    if cfg.optim.select_metric == "balanced_accuracy":
        raise ConfigError("--select-metric balanced_accuracy is for single-label data; multi-label runs take map "
                          "(the default), macro_f1 or accuracy")
    if "select_metric" not in cfg.given:
        cfg = cfg.replace(select_metric="map")
    return cfg


def budget_start() -> float:
    """When this command's time started: the process start for a fresh ``visiontune`` command (its
    interpreter start-up counts), else now (later entries of ``compare``, a notebook session)."""
    global _STARTED_BEFORE
    started, now = process_started(), time.time()
    first, _STARTED_BEFORE = not _STARTED_BEFORE, True
    return started if first and now - started < FRESH_PROCESS_S else now


_STARTED_BEFORE = False
FRESH_PROCESS_S = 120.0  # a process older than this was not started for this command


def plan_budget(cfg: TrainConfig, model, pre: Preprocessing, splits: Splits, default_side: int,
                started: float) -> tuple[TrainConfig, Preprocessing, Plan]:
    """Measure this machine and plan the run for ``cfg.runtime.time``; return the planned config
    (the user's own options kept) and preprocessing."""
    budget = parse_duration(cfg.runtime.time)
    native = median_side([p for p, _ in splits.train])
    fixed = {k: cfg.get(k) for k in PLANNED if k in cfg.given}
    sizes = [fixed["img_size"]] if "img_size" in fixed else candidate_sizes(native, default_side)
    print(f"time budget {format_duration(budget)}: measuring this machine at {', '.join(map(str, sizes))} px "
          f"(images' median side {native} px)", flush=True)
    throughputs = probe(model, sizes, cfg.runtime.precision, cfg.optim.batch_size)
    decode_s = decode_seconds([p for p, _ in splits.train], pre)
    plan = plan_run(budget, len(splits.train), len(splits.val), native, default_side, throughputs,
                    elapsed=time.time() - started, n_test=len(splits.test), fixed=fixed, decode_s=decode_s)
    print(plan.describe(), flush=True)
    planned = cfg.replace(**{k: v for k, v in plan.overrides().items() if k not in fixed})
    pre = replace(pre.with_size(plan.img_size), resize_mode=planned.model.resize_mode)
    return planned, pre, plan


def fit(ctx: TrainContext) -> None:
    """Train ``ctx``'s model with its strategy; the best epoch ends up in ``RUN/model``."""
    STRATEGIES.get(ctx.cfg.strategy.name)(ctx)


def _distributed_run_dir(cfg: TrainConfig, prefix: str) -> Path:
    """Every rank must write into one run dir.

    Lightning's launcher re-runs this command for ranks > 0 with rank 0's environment, so rank 0
    publishes its run dir in VISIONTUNE_RUN_DIR; under torchrun/SLURM all ranks start at once
    and need an explicit --run-dir.
    """
    inherited = os.environ.get(RUN_DIR_ENV)
    rt = cfg.runtime
    if not is_rank_zero():
        if inherited:
            return Path(inherited)
        if not rt.run_dir:
            raise ConfigError("multi-process training started by torchrun/SLURM needs an explicit --run-dir")
        Path(rt.run_dir).mkdir(parents=True, exist_ok=True)
        return Path(rt.run_dir)
    run_dir = make_run_dir(rt.run_dir, prefix)
    if rt.devices != 1 or rt.num_nodes != 1:
        os.environ[RUN_DIR_ENV] = str(run_dir)
    return run_dir


def report_data(splits: Splits, layout: RunLayout) -> None:
    """Write the splits and the skipped files into the run; print the data summary."""
    write_skipped(splits.skipped, layout.skipped)
    layout.splits.mkdir(exist_ok=True)
    for split in ("train", "val", "test"):
        if getattr(splits, split):
            write_split_csv(getattr(splits, split), splits.class_names, layout.split_csv(split))
    print(f"data: {len(splits.class_names)} classes, {len(splits.train)} train / {len(splits.val)} val"
          + (f" / {len(splits.test)} test" if splits.test else "") + f" images ({splits.layout} layout)")
    if splits.task == "multi":
        counts = splits.counts("train")
        per_image = sum(counts.values()) / max(1, len(splits.train))
        rare = sorted(counts.items(), key=lambda kv: kv[1])[:3]
        print(f"labels: {per_image:.2f} per training image on average; rarest: "
              + ", ".join(f"{n} {c}" for c, n in rare))
    counts = [c for c in splits.counts("train").values() if c > 0]
    if counts and max(counts) > IMBALANCE_WARNING * min(counts):
        smallest = sorted(splits.counts("train").items(), key=lambda kv: kv[1])[:3]
        print(f"warning: class imbalance {max(counts)}:{min(counts)} in train (smallest: "
              + ", ".join(f"{n} {c}" for n, c in smallest)
              + "); consider --balance weights or --balance sampler, and --select-metric macro_f1")
    if splits.skipped:
        print(f"skipped {len(splits.skipped)} unreadable file(s), listed in {layout.skipped}")


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
    """The saved config and the newest readable checkpoint of an interrupted run."""
    layout = RunLayout(cfg.runtime.resume)
    if not layout.config.is_file():
        raise ConfigError(f"--resume {layout.root}: no config.yaml there; is it a visiontune run dir?")
    for stale in remove_stale_temp_files(layout.checkpoints):  # none when the folder is missing
        print(f"removed half-written {stale.name} (the run was killed while saving it)")
    ckpt = newest_valid_checkpoint(layout.checkpoints)
    if ckpt is None:
        raise ConfigError(f"--resume {layout.root}: no readable checkpoint in {layout.checkpoints}; "
                          "start a new run instead")
    resumed = TrainConfig.load(layout.config).replace(resume=str(layout.root))
    print(f"resuming {layout.root} from {ckpt.name}")
    return resumed, layout.root, ckpt
