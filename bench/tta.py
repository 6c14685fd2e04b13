"""Test-time augmentation on held-out images: `python -m bench.tta --run RUN [--run RUN ...]`.

Each run (a `visiontune train` run dir of bench.budget's CIFAR-10 carve: trained on its 40,000
training images) is scored on the 10,000 carved held-out images under every mode of
visiontune.models.tta (`Classifier.load(run, tta=MODE)`: the implementation every surface uses),
with the images per second of each mode on this machine, and, where the run measured `--tta
auto` at its end, what it measured on its val split and kept.

  python -m bench.tta --run /tmp/visiontune-bench-budget/runs/cifar-15m
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

from bench.__main__ import ROOT, cpu_flags, machine, unpack
from bench.budget import carve, write_results
from visiontune.inference.classifier import Classifier
from visiontune.models.tta import TTA_MODES

SECTION = "## Test-time augmentation"


def score(run: Path, rows: list[tuple[str, str]], mode: str) -> tuple[float, float]:
    """Held-out accuracy of ``run`` under ``mode``, and images per second (decoding included)."""
    clf = Classifier.load(run, precision="32", tta=mode)
    began = time.perf_counter()
    logits, ok, _ = clf.logits_of([p for p, _ in rows], batch_size=128)
    seconds = time.perf_counter() - began
    y = torch.tensor([clf.class_names.index(label) for _, label in rows])
    return float((logits.argmax(1) == y)[ok].float().mean()), len(rows) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, type=Path, help="a run dir (repeatable)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/visiontune-bench-budget"))
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    data = unpack(args.data_root, args.work)
    _, test_csv = carve(data["cifar10"], args.work)
    rows = [(r["path"], r["label"]) for r in csv.DictReader(open(test_csv))]
    began = time.time()
    lines = [f"Machine: {machine()}", "",
             f"Command: `python -m bench.tta {' '.join('--run ' + str(r) for r in args.run)}`", "",
             f"CIFAR-10's {len(rows):,} carved held-out images, scored by each run's model under each mode "
             "(`Classifier.load(run, tta=MODE)`, fp32; images/s include decoding, batch 128):", "",
             "| run | input | " + " | ".join(f"`{m}` acc (img/s)" for m in TTA_MODES) + " | `--tta auto` at the end "
             "of the run (val) |", "| --- | ---: | " + " | ".join("---:" for _ in TTA_MODES) + " | --- |"]
    for run in args.run:
        card = json.loads((run / "model" / "model.json").read_text())
        cells = []
        for mode in TTA_MODES:
            acc, speed = score(run, rows, mode)
            cells.append(f"{acc:.4f} ({speed:.0f})")
            print(f"{run.name} {mode}: {acc:.4f} at {speed:.0f} img/s", flush=True)
        choice = card.get("training", {}).get("tta_choice")
        auto = (f"{choice['measured']} {choice['one_view'] + choice['gain']:.4f} against one view "
                f"{choice['one_view']:.4f} on {choice['images']:,} val images: kept {choice['mode']}"
                if choice else "not measured (an earlier run)")
        lines.append(f"| {run.name} | {card['preprocessing']['input_size'][1]} px | {' | '.join(cells)} | {auto} |")
    lines += ["", f"Took {(time.time() - began) / 60:.0f} min (CPU flags: {cpu_flags()})"]
    print("\n".join(lines))
    write_results(ROOT / "bench" / "RESULTS.md", SECTION, "\n".join([SECTION, "", *lines]) + "\n")


if __name__ == "__main__":
    main()
