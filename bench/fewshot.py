"""Few-shot curve: the plain `visiontune train` (planned) beside the probe and the fixed recipe.

`python -m bench.fewshot [--shots 10,25,50,100] [--repeats 3] [--probe-repeats 1] [--old-repeats 1]`

Small sets whose classes are not ImageNet classes, scored on held-out images never trained on:

- CIFAR-10 (../shared/data): 200 held-out images per class are carved once (seed 0); each
  training subset draws ``k`` images per class from the rest (seed = repeat).
- scikit-learn's digits (8x8 scans, as `visiontune demo` writes them): its held-out test split;
  each training subset draws ``k`` images per class from its train split.

For every (set, k, repeat) the whole command runs on the subset: the plain command (no flag:
the default plan: on small photo sets the cross-validated probe, on CIFAR-10's small images a
fine-tune where one fits, on digits' 8-px scans the probe again: no input of 48 px is in reach),
the cross-validated probe (`--strategy linear-probe`, the plain
command's plan for all small data until the planner weighed a fine-tune), and the fixed recipe
that the plain command ran before plans were the default (`--time none`: 10 epochs of
fine-tuning at the backbone's 224 px). The table gives held-out accuracy (mean +- std over
repeats) and the whole command's seconds; the probe and the fixed recipe run on the first
subsets drawn, so their repeat 0 pairs with the plain command's. Results go to stdout and the
"## Few-shot" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import visiontune
from bench.__main__ import ROOT, unpack
from bench.budget import publish, run

SECTION = "## Few-shot"
FIXED = ("--time", "none")
PROBE = ("--strategy", "linear-probe")
ARMS = {"plain": (), "probe": PROBE, "fixed": FIXED}  # the table's columns, in order


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return path


def by_class(root: Path) -> dict[str, list[str]]:
    return {d.name: sorted(str(p) for p in d.iterdir() if p.is_file()) for d in sorted(root.iterdir()) if d.is_dir()}


def cifar_pool(cifar: Path, held_per_class: int = 200) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """(training pool by class, held-out rows): ``held_per_class`` per class held out with seed 0."""
    rng, pool, held = random.Random(0), {}, []
    for cls, files in by_class(cifar).items():
        files = files[:]
        rng.shuffle(files)
        held += [(f, cls) for f in files[:held_per_class]]
        pool[cls] = files[held_per_class:]
    return pool, held


def digits_pool(work: Path) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    from visiontune.data.digits import materialise_digits

    root = work / "digits"
    if not (root / "train").is_dir():
        materialise_digits(root)
    held = [(f, cls) for cls, files in by_class(root / "test").items() for f in files]
    return by_class(root / "train"), held


def held_out_accuracy(run_dir: Path, held: list[tuple[str, str]]) -> float:
    model = visiontune.load(run_dir)
    logits, ok, _ = model.logits_of([p for p, _ in held])  # [n, C] for every input, ``ok`` marks the readable
    labels = torch.tensor([model.class_names.index(c) for _, c in held])
    return float(((logits.argmax(1) == labels) & ok).float().mean())  # an unreadable image counts as wrong


def one(work: Path, name: str, train_csv: Path, held: list[tuple[str, str]], *flags: str) -> tuple[float, float]:
    run_dir = work / "runs" / name
    for path in (run_dir, work / "caches" / name):  # a rerun starts afresh (a cold feature cache, as the first)
        shutil.rmtree(path, ignore_errors=True)
    seconds = run([sys.executable, "-m", "visiontune.cli", "train", str(train_csv), "--run-dir", str(run_dir),
                   "--no-progress", *flags], work / f"{name}.log", {"VISIONTUNE_CACHE": str(work / "caches" / name)})
    return held_out_accuracy(run_dir, held), seconds


def cell(accs: list[float], seconds: list[float]) -> str:
    if not accs:
        return "not run"
    spread = f" +- {statistics.stdev(accs):.4f}" if len(accs) > 1 else ""
    return f"{statistics.mean(accs):.4f}{spread} ({len(accs)}x, {statistics.mean(seconds):.0f} s)"


def curve(work: Path, set_name: str, pool: dict[str, list[str]], held: list[tuple[str, str]], shots: list[int],
          repeats: dict[str, int]) -> list[str]:
    """One table row per ``k``: each arm of ``repeats`` (plain, probe, fixed: how many subsets each runs)."""
    rows = []
    for k in shots:
        if any(len(files) < k for files in pool.values()):
            continue
        results: dict[str, list[float]] = {kind: [] for kind in ARMS}
        seconds: dict[str, list[float]] = {kind: [] for kind in ARMS}
        for r in range(max(repeats.values())):
            rng = random.Random(r)
            subset = [(f, cls) for cls, files in pool.items() for f in rng.sample(files, k)]
            train_csv = write_csv(work / "subsets" / f"{set_name}-{k}-r{r}.csv", subset)
            for kind, flags in ARMS.items():
                if r < repeats[kind]:
                    acc, secs = one(work, f"{set_name}-{k}-r{r}-{kind}", train_csv, held, *flags)
                    results[kind].append(acc)
                    seconds[kind].append(secs)
                    print(f"{set_name} {k}/class repeat {r} {kind}: held-out accuracy {acc:.4f} in {secs:.0f} s",
                          flush=True)
        rows.append(f"| {set_name} | {k} | " + " | ".join(cell(results[a], seconds[a]) for a in ARMS) + " |")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "visiontune-bench-fewshot")
    ap.add_argument("--sets", default="cifar10,digits")
    ap.add_argument("--shots", default="10,25,50,100", help="training images per class, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="subsets drawn per point for the plain command")
    ap.add_argument("--probe-repeats", type=int, default=1, help="the same for the probe (0: skip)")
    ap.add_argument("--old-repeats", type=int, default=1, help="the same for the fixed recipe (0: skip)")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    shots = [int(k) for k in args.shots.split(",")]
    lines = []
    for set_name in args.sets.split(","):
        if set_name == "cifar10":
            pool, held = cifar_pool(unpack(args.data_root, args.work)["cifar10"])
        elif set_name == "digits":
            pool, held = digits_pool(args.work)
        else:
            ap.error(f"--sets takes cifar10 and digits, not {set_name}")
        lines += curve(args.work, set_name, pool, held, shots,
                       {"plain": args.repeats, "probe": args.probe_repeats, "fixed": args.old_repeats})
    command = (f"python -m bench.fewshot --sets {args.sets} --shots {args.shots} --repeats {args.repeats} "
               f"--probe-repeats {args.probe_repeats} --old-repeats {args.old_repeats}")
    publish(args.results, SECTION, command,
            ["Held-out accuracy (mean +- std over the repeats; the whole command's mean seconds):", "",
             "| set | images per class | plain `visiontune train` | `--strategy linear-probe` | "
             "`--time none` (the fixed recipe) |",
             "| --- | ---: | ---: | ---: | ---: |", *lines], start)


if __name__ == "__main__":
    sys.exit(main())
