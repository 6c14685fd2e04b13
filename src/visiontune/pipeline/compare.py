"""``visiontune compare DATA --strategies a,b [--models x,y]``: one table, same split and seed.

Each (model, strategy) pair is trained with :func:`visiontune.train` into ``OUT/<model>-<strategy>``
sharing one feature cache, so frozen-backbone features are computed once. A time budget (``--time``,
or the default of a run given neither ``--time`` nor ``--epochs``) is shared equally by the entries.
The table (strategy, model, accuracy, macro-F1, macro mAP for multi-label data, train seconds, model size) is written to
``OUT/compare.csv`` and copied into every run dir, where ``visiontune report`` shows it.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..core.layout import RunLayout
from ..core.tables import fixed_width
from ..models.weights import is_model_folder
from ..training.budget import format_duration, run_budget
from ..training.config import COMPARE_OWN, MIN_DURATION_S, TrainConfig
from ..training.levers import check_options
from ..training.registry import STRATEGIES
from ..training.setup import make_run_dir
from .train import train

OWN_OPTIONS = COMPARE_OWN  # options compare sets for each entry, and what to use instead

COLUMNS = ["strategy", "model", "accuracy", "macro_f1", "macro_map", "train_seconds", "model_size_mb", "run_dir"]
SCORES = ("accuracy", "macro_f1", "macro_map")  # val metrics compared (multi-label: macro_f1 and macro_map)


def compare(data: str | os.PathLike, strategies: Sequence[str] = ("finetune", "linear-probe", "progressive"),
            models: Sequence[str] = ("efficientnet_lite0",), run_dir: str | None = None, **train_options: Any
            ) -> list[dict[str, Any]]:
    """Train every (strategy, model) on the same split and seed; return and save the table.

    ``train_options`` are options of ``visiontune train`` (``epochs=3``, ``seed=0``...), except those
    compare sets itself for every entry (:data:`OWN_OPTIONS`).

    Example:
        rows = compare("data/hymenoptera/train", ["finetune", "linear-probe"], epochs=3)
        [r["accuracy"] for r in rows]
        # -> [0.96, 0.94]
    """
    # a comma-separated string (the CLI's --strategies a,b) or a sequence of names
    strategies = [s.strip() for s in strategies.split(",") if s.strip()] if isinstance(strategies, str) else strategies
    models = [m.strip() for m in models.split(",") if m.strip()] if isinstance(models, str) else models
    if not strategies:
        raise ConfigError(f"give at least one strategy: {', '.join(STRATEGIES)}")
    for strategy in strategies:
        STRATEGIES.check(strategy)
    if not models:
        raise ConfigError("give at least one model")
    if train_options.get("report") is False:
        train_options.pop("report")  # what compare does anyway
    own = sorted(set(train_options) & set(OWN_OPTIONS))
    if own:
        raise ConfigError(f"compare sets {', '.join(own)} itself for every entry; "
                          + "; ".join(OWN_OPTIONS[k] for k in own))
    cfg = TrainConfig.from_dict({"data": str(data), **train_options})  # fail fast on bad options
    for strategy in strategies:  # an option one entry cannot honour is refused before any entry trains
        check_options(TrainConfig.from_dict({"data": str(data), **train_options, "strategy": strategy}))
    if is_model_folder(cfg.model.weights):  # one trained network cannot start every --models entry
        raise ConfigError(f"compare trains each --models entry from its own weights (--weights default, none or a "
                          f"weights file); --weights {cfg.model.weights} is a trained model: continue it with "
                          "visiontune train DATA --weights RUN")
    entries = len(models) * len(strategies)
    budget = run_budget(cfg)
    if budget is not None:  # the comparison's budget (given, or the default) is shared equally by its entries
        share = budget / entries
        if share < MIN_DURATION_S:
            raise ConfigError(f"compare shares its time budget ({format_duration(budget)}) among {entries} entries: "
                              f"{format_duration(share)} each, under the {MIN_DURATION_S:.0f}s minimum; give at least "
                              f"--time {format_duration(MIN_DURATION_S * entries)}, fewer entries, or --epochs N")
        print(f"compare: time budget {format_duration(budget)}"
              + (" (the default without --time or --epochs)" if cfg.runtime.time is None else "")
              + f", {format_duration(share)} for each of {entries} entries", flush=True)
        train_options["time"] = format_duration(share)
    out = make_run_dir(run_dir, "compare")
    train_options.setdefault("cache_dir", str(out / "feature-cache") if not os.environ.get("VISIONTUNE_CACHE")
                             else None)
    if train_options["cache_dir"] is None:
        train_options.pop("cache_dir")
    rows: list[dict[str, Any]] = []
    for model in models:
        for strategy in strategies:
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{model}-{strategy}")
            print(f"== compare: {strategy} on {model} -> {out / name}", flush=True)
            start = time.perf_counter()
            run = train(data, strategy=strategy, model=model, run_dir=str(out / name), report=False, **train_options)
            seconds = time.perf_counter() - start
            val = run.metrics.get("val", {})
            rows.append({"strategy": strategy, "model": model,
                         **{k: round(float(val[k]), 4) if k in val else "" for k in SCORES},
                         "train_seconds": round(seconds, 1),
                         "model_size_mb": round((run.model_dir / "model.safetensors").stat().st_size / 2**20, 2),
                         "run_dir": str(run.run_dir)})
            write_csv(rows, RunLayout(out).compare_csv)
    for row in rows:
        shutil.copyfile(RunLayout(out).compare_csv, RunLayout(row["run_dir"]).compare_csv)
    print(f"compare: {RunLayout(out).compare_csv}")
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def format_table(rows: list[dict[str, Any]]) -> str:
    """The comparison as a console table."""
    scores = [k for k in SCORES if any(r[k] != "" for r in rows)]  # the columns this task has
    header = ["strategy", "model", *scores, "train_s", "size_mb"]
    cells = [[r["strategy"], r["model"], *(f"{r[k]:.4f}" if r[k] != "" else "" for k in scores),
              f"{r['train_seconds']:.1f}", f"{r['model_size_mb']:.2f}"] for r in rows]
    return fixed_width(header, cells, left=2)
