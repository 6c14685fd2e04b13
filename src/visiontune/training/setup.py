"""Before training: run dir, seeded RNGs, checked data splits and the model, or a resumed run.

Everything that can fail on the user's input runs before a run dir exists, so a failed start
leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import replace
from pathlib import Path

from ..core.errors import ArtifactError, ConfigError
from ..core.hardware import available_memory, device, is_rank_zero, resolve_precision
from ..core.layout import RunLayout
from ..core.registry import TRAIN_PRECISIONS
from ..data.labels import per_task
from ..data.memory import should_cache, store_side
from ..data.preprocess import Preprocessing
from ..data.scan import MAX_HELD_OUT, Splits, discover, median_side, write_skipped, write_split_csv
from ..models.artifact import load_weights, read_card, resolve_model_dir
from ..models.card import ModelCard
from ..models.factory import build_model, fit_input_size
from ..models.groups import bottom_parameter_names
from ..models.lowres import is_lowres
from ..models.tta import takes_side, takes_zoom
from ..models.weights import is_model_folder
from ..task import TASKS, Task, get_task
from .budget import (
    FORECAST_MIN_IMAGE_EPOCHS,
    MIN_FINETUNE_SIDE,
    Facts,
    Plan,
    Throughput,
    candidate_sizes,
    decode_seconds,
    fixed_options,
    forecast,
    format_duration,
    measure_throughput,
    probe_only,
    probe_side,
    run_budget,
)
from .checkpoint_io import newest_valid_checkpoint, remove_stale_temp_files
from .config import OPTIONS, TrainConfig, no_budget
from .context import FitResult, TrainContext
from .distill import Teacher
from .levers import check_options, levers_line
from .lowres_plan import (
    LOWRES_SIDE,
    best_finetune,
    choose_plan,
    considers_lowres,
    lowres_may_win,
    measure_lowres,
    network_recipe,
)
from .registry import AUTO_TTA, LOGGERS, RANDOM_INIT, STRATEGIES
from .tta_choice import AUTO, why_one_view

RUN_DIR_ENV = "VISIONTUNE_RUN_DIR"
STARTED_ENV = "VISIONTUNE_STARTED"  # rank 0's clock start, for the processes Lightning's launcher starts
IMBALANCE_WARNING = 5.0  # max/min class ratio above which training warns


def setup_run(cfg: TrainConfig, prefix: str = "train", started: float | None = None) -> TrainContext:
    """Run dir, seeded RNGs, checked data splits and the model: everything before training.

    ``started`` is when the command's time began (``time.time()`` units; default: now): a
    ``--time`` budget counts from it, so the CLI passes its process start.

    Example:
        ctx = setup_run(TrainConfig.from_dict({"data": "photos", "epochs": 1}))
    """
    import lightning as L  # lazy: Lightning loads only when a run starts (not for --help or errors)

    started = time.time() if started is None else started
    if not is_rank_zero() and os.environ.get(STARTED_ENV):
        # a process Lightning's launcher started for rank 0: rank 0's clock is the run's (one deadline,
        # and the plan rank 0 wrote after that start is this run's)
        try:
            started = float(os.environ[STARTED_ENV])
        except ValueError:
            pass
    if cfg.runtime.time and not no_budget(cfg.runtime.time) and cfg.runtime.resume:
        print("time budget: --resume continues the run's own planned epochs; --time applies to new runs only",
              flush=True)
    resume_ckpt = None
    run_dir: Path | None = None
    if cfg.runtime.resume:
        cfg, run_dir, resume_ckpt = prepare_resume(cfg)
    elif not cfg.data.path:
        raise ConfigError("no data given: visiontune train DATA (a folder or a path,label CSV)")
    if not cfg.runtime.resume:  # a resumed run's options were checked when it started
        check_options(cfg)
    L.seed_everything(cfg.runtime.seed, workers=True, verbose=False)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    # everything that can fail on user input runs before a run dir exists
    splits = discover(cfg.data.path, cfg.data.val, cfg.data.val_fraction, cfg.runtime.seed,
                      task=cfg.data.task, label_delim=cfg.data.label_delim, cap_val="val_fraction" not in cfg.given)
    if splits.val_fraction is not None and splits.val_fraction != cfg.data.val_fraction:
        # recorded as the run's share, so that every later split of the data (resume, report, export) is this one
        print(f"validation: {len(splits.val)} images held out ({splits.val_fraction:.1%}; at most {MAX_HELD_OUT} "
              "unless --val-fraction is given)", flush=True)
        cfg = cfg.replace(val_fraction=splits.val_fraction)
    for note in (splits.task_note, splits.outside_warning()):
        if note:
            print(note, flush=True)
    cfg = adapt_to_task(cfg, splits.task)
    cfg, start = (cfg, None) if cfg.runtime.resume else trained_start(cfg, splits)
    if is_lowres(cfg.model.name) and "strategy" not in cfg.given:  # a network with no pretrained weights
        cfg = cfg.replace(strategy="scratch")
        if not cfg.runtime.resume:  # the options given are now those of training from scratch
            try:
                check_options(cfg, remedy="choose a pretrained --model")
            except ConfigError as exc:
                raise ConfigError(f"--model {cfg.model.name} has no pretrained weights and trains from scratch "
                                  f"(--strategy scratch): {exc}") from None
    if start is not None and cfg.strategy.name in RANDOM_INIT:
        raise ConfigError(f"--weights {cfg.model.weights} starts from a trained network, which --strategy "
                          f"{cfg.strategy.name} (random init; the recipe of {cfg.model.name}) would discard: give "
                          "--strategy finetune, or drop --weights")
    # a trained model's folder is loaded below (as is a resumed run's checkpoint): the network is built empty
    weights = "none" if cfg.strategy.name in RANDOM_INIT or is_model_folder(cfg.model.weights) else cfg.model.weights
    model_name = cfg.model.name
    model, arch, pre = build_model(model_name, len(splits.class_names), weights)
    default_side = pre.height  # the backbone's own input size
    if start is not None:  # every tensor, the classifier too (its classes are the data's), and its preprocessing
        load_weights(model, start)
        pre = start.preprocessing
    if cfg.model.img_size:
        pre = pre.with_size(cfg.model.img_size)
    pre = replace(pre, resize_mode=cfg.model.resize_mode)
    plan, deadline = None, None
    # what --freeze-bottom keeps frozen: checked here, before a run dir exists, and measured so by the probes
    frozen = (bottom_parameter_names(model, arch.classifier, cfg.strategy.freeze_bottom)
              if cfg.strategy.name == "finetune" else [])
    budget = run_budget(cfg)
    if budget is not None:
        # one plan per run: rank 0 measures and plans, the other processes of a multi-process run read it
        if is_rank_zero():
            plan = plan_budget(cfg, model, pre, splits, default_side, started, budget,
                               trained_side=continued_side(start), frozen=frozen)
        else:
            plan = read_plan(RunLayout(_distributed_run_dir(cfg, prefix)).plan, started)
        cfg = plan.apply(cfg)
        if cfg.model.name != model_name:  # the plan chose another network (one built for small images)
            weights = "none" if cfg.strategy.name in RANDOM_INIT else cfg.model.weights
            model, arch, pre = build_model(cfg.model.name, len(splits.class_names), weights)
        pre = replace(pre.with_size(plan.img_size), resize_mode=cfg.model.resize_mode)
        check_options(cfg, planned=True)
        deadline = started + budget
    elif is_lowres(cfg.model.name) and not cfg.runtime.resume:  # the compact networks' own recipe
        cfg = cfg.replace(**network_recipe(cfg.given, cfg.optim.epochs))
        pre = replace(pre, resize_mode=cfg.model.resize_mode)
    fit_input_size(model, pre.height, pre.width)  # ViTs: position embeddings for the chosen size
    early = cfg.optim.early_size
    if early is not None and not cfg.runtime.resume and (early >= pre.height or not takes_side(model, early)):
        why = (f"is not smaller than the input size {pre.height} px" if early >= pre.height
               else f"is a size {arch.name} does not take (it runs only at the input size it was built for)")
        raise ConfigError(f"--early-size {early} {why}: give a smaller --early-size, or drop --early-size and "
                          "--early-steps")
    if cfg.model.tta in (AUTO_TTA, AUTO) and not cfg.runtime.resume and not takes_zoom(model, pre.height):
        if cfg.model.tta == AUTO_TTA:
            raise ConfigError(f"--tta {AUTO_TTA}: {arch.name} takes only the input size it was built for "
                              f"({pre.height} px), not the enlarged view; use --tta flip or --tta none")
        print(f"test-time augmentation: one view ({arch.name} takes only its own input size, not a zoomed view)")
        cfg = cfg.replace(tta="none")
    if (budget is None and not cfg.runtime.resume
            and len(splits.train) * cfg.optim.epochs >= FORECAST_MIN_IMAGE_EPOCHS):
        finetune = cfg.strategy.name != "linear-probe"
        measures = not why_one_view(get_task(splits.task).name == "single", len(splits.val))
        tta = None if cfg.model.tta == AUTO and not measures else cfg.model.tta
        # the precision this run resolves to (without a plan nothing ranks precisions)
        runs_in = resolve_precision(cfg.runtime.precision, pre.height, TRAIN_PRECISIONS)
        (measured,) = measure_throughput(model, [pre.height], runs_in, cfg.optim.batch_size, seconds=1.0, frozen=frozen)
        _, line = forecast(measured, len(splits.train), len(splits.val), len(splits.test), cfg.optim.epochs,
                           min(cfg.strategy.freeze_epochs, cfg.optim.epochs) if finetune else 0, finetune,
                           time.time() - started, tta, len(splits.class_names))
        print(line, flush=True)
    teacher = None
    if cfg.optim.teacher:  # loaded and checked against the data before a run dir exists
        if get_task(splits.task).name != "single" or cfg.strategy.name == "linear-probe":
            raise ConfigError("--teacher distils into a single-label network trained on images (--strategy "
                              f"finetune, progressive or scratch); this run is {get_task(splits.task).title}, "
                              f"--strategy {cfg.strategy.name}")
        teacher = Teacher(cfg.optim.teacher, pre, splits.class_names)
    precision = resolve_precision(cfg.runtime.precision, pre.height, TRAIN_PRECISIONS)
    cache, needed = should_cache(cfg.data.cache_images, [p for p, _ in splits.train],
                                 store_side(pre, cfg.data.augment), available_memory())
    if run_dir is None:
        run_dir = _distributed_run_dir(cfg, prefix)
    if is_rank_zero() and cfg.runtime.devices * cfg.runtime.num_nodes > 1:
        os.environ[STARTED_ENV] = repr(started)  # inherited by the processes the launcher starts
    layout = RunLayout(run_dir)
    if is_rank_zero():
        report_data(splits, layout)
        resolved = cfg.replace(run_dir=str(run_dir))  # the user's cfg is left as given
        resolved.save(layout.config)
        if plan is not None:
            plan.save(layout.plan)
    shown = f"the trained model {cfg.model.weights}" if start is not None else weights
    print(f"model: {cfg.model.name} ({arch.source}:{arch.name}, weights={shown}), strategy {cfg.strategy.name}, "
          f"input {pre.height}x{pre.width} {pre.resize_mode}, precision {precision}"
          + (f", images in memory (~{needed / 2**20:.0f} MiB)" if cache else ""))
    print(levers_line(cfg))
    ctx = TrainContext(cfg, layout, model, arch, pre, splits, precision, resume_ckpt, cfg.optim.batch_size, cache,
                       deadline, plan, started=started, teacher=teacher)
    ctx.logger = LOGGERS.get(cfg.runtime.logger)(run_dir, layout.logs, Path(run_dir).name,
                                                 cfg.replace(run_dir=str(run_dir)).to_dict())
    return ctx


def trained_start(cfg: TrainConfig, splits: Splits) -> tuple[TrainConfig, ModelCard | None]:
    """``--weights RUN|MODEL``: a visiontune model starts the run, its classifier included.

    Returns ``cfg`` fitted to the model and its validated card, or ``(cfg, None)`` when ``--weights``
    is not a folder. The model's network becomes ``--model`` (fixed: a plan keeps it); its resize
    mode is the run's and the head-only epochs are none (its head is trained), unless given; its
    input size is the run's unless given, and the largest a plan measures (the plan may choose a
    smaller one where more passes over the data fit:
    :data:`~visiontune.training.budget.MIN_CONTINUED_PASSES`); the strategy is the user's or the
    plan's (a probe refits the classifier on the trained body); ``--weights`` is recorded as the
    model folder's absolute path. Its classes and task must be the data's (the kept classifier
    answers them): :class:`ConfigError` naming the remedy otherwise, as for a pruned model or a
    folder that holds no visiontune model.
    """
    if not is_model_folder(cfg.model.weights):
        return cfg, None
    folder = cfg.model.weights
    try:
        card = read_card(resolve_model_dir(folder))  # validated: a model folder may come from anyone
    except ArtifactError as exc:
        raise ConfigError(f"--weights {folder}: {exc} Give a run or model folder from `visiontune train`, or a "
                          ".safetensors/.pth file") from None
    task = get_task(splits.task)
    if card.class_names != list(splits.class_names) or card.task.name != task.name:
        raise ConfigError(f"--weights {folder}: that model answers {card.task.title} {_few(card.class_names)}, the "
                          f"data has {task.title} {_few(splits.class_names)}; a trained model starts only a run on "
                          "the same classes (use --weights default for the pretrained backbone, or the folder's "
                          "model/model.safetensors for its network without its classifier)")
    if card.architecture is None or card.pruned is not None:
        raise ConfigError(f"--weights {folder}: a {'pruned' if card.pruned else 'exported'} model cannot start a "
                          "run; give the run it came from")
    arch = card.architecture
    if "model" in cfg.given and cfg.model.name not in (arch.model_name, arch.requested, arch.name, f"timm:{arch.name}"):
        raise ConfigError(f"--weights {folder} is a {arch.requested or arch.model_name} model, not "
                          f"{cfg.model.name}: drop --model (the model's own network is used)")
    fitted = {"resize_mode": card.preprocessing.resize_mode, "freeze_epochs": 0}
    # its input size is the run's unless given, and a plan may choose a smaller one where more passes fit
    out = cfg.replace(model=arch.model_name, weights=str(Path(card.model_dir).resolve()),
                      **{k: v for k, v in {**fitted, "img_size": card.preprocessing.height}.items()
                         if k not in cfg.given})
    out.given = cfg.given | {"model", "weights", *fitted}
    return out, card


def continued_side(card: ModelCard | None) -> int | None:
    """The input side of a trained model whose network a run continues (``--weights RUN``), else
    ``None``: a probe's body is still the pretrained backbone's, so its run plans as a fresh one."""
    if card is None or card.training.get("strategy") == "linear-probe":
        return None
    return card.preprocessing.height


def _few(names) -> str:
    names = list(names)
    return str(names[:6])[:-1] + (", ...]" if len(names) > 6 else "]")


def adapt_to_task(cfg: TrainConfig, task: str | Task) -> TrainConfig:
    """Refuse a ``--select-metric`` the task does not compute, naming the task that does and what this
    one takes; the task's own default selection (multi-label: macro mAP) applies unless told."""
    task = get_task(task)
    default = task.default_selection
    takes = [default, *(m for m in (*task.selection_metrics, "accuracy") if m != default)]
    metric = cfg.optim.select_metric
    if metric not in takes:
        owner = next((t.title for t in TASKS.values() if metric in t.selection_metrics), "another kind of")
        # "(the default)" where the task's default is not the option's own
        shown = [f"{m} (the default)" if m == default != OPTIONS["select_metric"].default else m for m in takes]
        raise ConfigError(f"--select-metric {metric} is for {owner} data; {task.title} runs take "
                          f"{', '.join(shown[:-1])} or {shown[-1]}")
    if "select_metric" not in cfg.given and metric != default:
        cfg = cfg.replace(select_metric=default)
    return cfg


def plan_budget(cfg: TrainConfig, model, pre: Preprocessing, splits: Splits, default_side: int, started: float,
                budget: float, trained_side: int | None = None, frozen: list[str] | None = None) -> Plan:
    """Measure this machine (the :class:`Facts`) and plan the run for ``budget`` seconds from
    ``started``, keeping the user's own options; print the plan and how to change the budget.
    ``trained_side``: the input side of the trained model the run continues (``--weights RUN``),
    the largest size measured; ``frozen``: the parameters ``--freeze-bottom`` keeps frozen."""
    native = median_side([p for p, _ in splits.train])
    fixed = fixed_options(cfg)
    rt = cfg.runtime
    processes = rt.devices * rt.num_nodes
    sizes = [fixed["img_size"]] if "img_size" in fixed else candidate_sizes(native, default_side)
    if trained_side and "img_size" not in fixed:
        sizes = sorted({s for s in sizes if s < trained_side} | {trained_side})
    if fixed.get("strategy") != "scratch" and any(s >= MIN_FINETUNE_SIDE for s in sizes):
        # a pretrained network is never fine-tuned below MIN_FINETUNE_SIDE: measuring there costs seconds
        sizes = [s for s in sizes if s >= MIN_FINETUNE_SIDE]
    probe = probe_only(len(splits.train), native, default_side, sizes, fixed, processes, trained_side)
    if probe:  # a probe on cached features at one size: its inference speed is all it needs
        sizes = [probe_side(sizes, default_side)]
    default = cfg.runtime.time is None
    how = (f" (the default: --time 20m or any budget changes it, --time none runs the fixed {cfg.optim.epochs}-epoch "
           "recipe)" if default else "")
    print(f"time budget {format_duration(budget)}{how}: measuring this machine at {', '.join(map(str, sizes))} px "
          f"(images' median side {native} px)", flush=True)
    throughputs = measure_throughput(model, sizes, rt.precision, cfg.optim.batch_size, train=not probe,
                                     frozen=frozen or ())
    if processes > 1 and device() == "cuda":  # one accelerator per process; CPU processes share the cores
        throughputs = [Throughput(t.size, t.train * processes, t.infer * processes, t.precision)
                       for t in throughputs]
    decode_s = decode_seconds([p for p, _ in splits.train], pre)
    # whether fine-tuning can hold the images in memory, at the largest size it may plan (if they fit
    # there, they fit at every smaller one); if not, every epoch decodes them again
    largest = pre.with_size(max(sizes))
    in_memory, _ = should_cache(cfg.data.cache_images, [p for p, _ in splits.train], store_side(
        largest, fixed.get("augment", "standard")), available_memory())
    facts = Facts(budget, len(splits.train), len(splits.val), native, default_side, throughputs,
                  elapsed=time.time() - started, n_test=len(splits.test), decode_s=decode_s,
                  batch_size=cfg.optim.batch_size, processes=processes, in_memory=in_memory,
                  num_classes=len(splits.class_names), unknown=cfg.model.unknown,
                  single_label=get_task(splits.task).name == "single",
                  zoom="tta" in fixed or takes_zoom(model, default_side), trained_side=trained_side)
    lowres = []
    if (considers_lowres(len(splits.train), native, fixed, get_task(splits.task).name == "single")
            and lowres_may_win(best_finetune(facts, fixed), facts, fixed)):
        print(f"images of {native} px: also measuring networks built for their size, trained from scratch", flush=True)
        small = Preprocessing((3, LOWRES_SIDE, LOWRES_SIDE), pre.mean, pre.std, crop_pct=1.0, resize_mode="squash")
        fits, _ = should_cache(cfg.data.cache_images, [p for p, _ in splits.train],
                               store_side(small, fixed.get("augment", "crop-flip")), available_memory())
        lowres = measure_lowres(len(splits.class_names), rt.precision, fixed, fits)
        facts = replace(facts, elapsed=time.time() - started)
    plan = choose_plan(facts, fixed, lowres)
    print(plan.describe(), flush=True)
    return plan


def fit(ctx: TrainContext) -> FitResult:
    """Train ``ctx``'s model with its strategy; the best epoch ends up in ``RUN/model``.

    Returns the strategy's :class:`FitResult`; its timings and calibration logits are also
    recorded in ``ctx`` (``timings.json`` and the calibration read them there).
    """
    result = STRATEGIES.get(ctx.cfg.strategy.name)(ctx) or FitResult()
    ctx.timings.update(result.timings)
    if result.calibration_logits is not None:
        ctx.calibration_logits = result.calibration_logits
    return result


PLAN_WAIT_S = 600.0  # how long another process of a run waits for rank 0's plan (measuring takes seconds)


def read_plan(path: Path, started: float, wait_s: float = PLAN_WAIT_S) -> Plan:
    """Rank 0's plan of this run, for the other processes of a multi-process run: every process
    trains the same plan (measured once) instead of planning on its own measurements.

    Under Lightning's launcher rank 0 wrote it before starting the others, and ``started`` is rank 0's
    clock start; under torchrun or SLURM all start at once and wait for it. A plan written before
    ``started`` (with 5 s for clocks and file times) belongs to an earlier run.
    """
    deadline = time.time() + wait_s
    while True:
        try:
            if path.stat().st_mtime >= started - 5.0:
                return Plan.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError):  # not written yet, or written as we read: try again
            pass
        if time.time() > deadline:
            raise ConfigError(f"rank 0 wrote no plan to {path} within {wait_s:.0f} s; start every process of the "
                              "run with the same --run-dir, or give --time none for the fixed recipe")
        time.sleep(0.5)


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
            write_split_csv(getattr(splits, split), splits.class_names, layout.split_csv(split), splits.task)
    print(f"data: {len(splits.class_names)} classes, {len(splits.train)} train / {len(splits.val)} val"
          + (f" / {len(splits.test)} test" if splits.test else "") + f" images ({splits.layout} layout)")
    line = per_task(LABELS_SUMMARY, splits.task, "labels summary")(splits)
    if line:
        print(line)
    counts = [c for c in splits.counts("train").values() if c > 0]
    if counts and max(counts) > IMBALANCE_WARNING * min(counts):
        smallest = sorted(splits.counts("train").items(), key=lambda kv: kv[1])[:3]
        print(f"warning: class imbalance {max(counts)}:{min(counts)} in train (smallest: "
              + ", ".join(f"{n} {c}" for n, c in smallest)
              + "); consider --balance weights or --balance sampler, and --select-metric macro_f1")
    if splits.skipped:
        print(f"skipped {len(splits.skipped)} unreadable file(s), listed in {layout.skipped}")


def _multi_label_summary(splits: Splits) -> str:
    """Multi-label data: the labels per training image, and the rarest labels."""
    counts = splits.counts("train")
    per_image = sum(counts.values()) / max(1, len(splits.train))
    rare = sorted(counts.items(), key=lambda kv: kv[1])[:3]
    return (f"labels: {per_image:.2f} per training image on average; rarest: "
            + ", ".join(f"{n} {c}" for c, n in rare))


#: The line the data summary adds about each task's labels ('' for none), by task name.
LABELS_SUMMARY = {"single": lambda splits: "", "multi": _multi_label_summary}


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
