"""``visiontune compare DATA --strategies a,b [--models x,y]``: one table, same split and seed.

Each (model, strategy) pair is trained with :func:`visiontune.train` into ``OUT/<model>-<strategy>``
sharing one feature cache, so frozen-backbone features are computed once. The table (strategy,
model, accuracy, macro-F1, train seconds, model size) is written to ``OUT/compare.csv`` and copied
into every run dir, where ``visiontune report`` shows it.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

COLUMNS = ["strategy", "model", "accuracy", "macro_f1", "train_seconds", "model_size_mb", "run_dir"]


def compare(data: str | os.PathLike, strategies: Sequence[str] = ("finetune", "linear-probe", "progressive"),
            models: Sequence[str] = ("efficientnet_lite0",), run_dir: str | None = None, **train_options: Any
            ) -> list[dict[str, Any]]:
    """Train every (strategy, model) on the same split and seed; return and save the table.

    ``train_options`` are :class:`visiontune.config.TrainConfig` fields (``epochs=3``, ``seed=0``...).

    Example:
        >>> rows = compare("data/hymenoptera/train", ["finetune", "linear-probe"], epochs=3)  # doctest: +SKIP
        >>> [r["accuracy"] for r in rows]  # doctest: +SKIP
        [0.96, 0.94]
    """
    from ..config import ConfigError, TrainConfig
    from ..training.runner import make_run_dir, train

    from ..config import CHOICES

    unknown = [s for s in strategies if s not in CHOICES["strategy"]]
    if unknown or not strategies:
        raise ConfigError(f"unknown strategies {unknown}; choose from: {', '.join(CHOICES['strategy'])}")
    if not models:
        raise ConfigError("give at least one model")
    for key in ("strategy", "model", "resume", "report"):
        train_options.pop(key, None)
    TrainConfig.from_dict({"data": str(data), **train_options})  # fail fast on bad options
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
            rows.append({"strategy": strategy, "model": model, "accuracy": round(float(val.get("accuracy", 0.0)), 4),
                         "macro_f1": round(float(val.get("macro_f1", 0.0)), 4), "train_seconds": round(seconds, 1),
                         "model_size_mb": round((run.model_dir / "model.safetensors").stat().st_size / 2**20, 2),
                         "run_dir": str(run.run_dir)})
            write_csv(rows, out / "compare.csv")
    for row in rows:
        shutil.copyfile(out / "compare.csv", Path(row["run_dir"]) / "compare.csv")
    print(f"compare: {out / 'compare.csv'}")
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["strategy", "model", "accuracy", "macro_f1", "train_s", "size_mb"]
    cells = [[r["strategy"], r["model"], f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}", f"{r['train_seconds']:.1f}",
              f"{r['model_size_mb']:.2f}"] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines += ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join(lines)
