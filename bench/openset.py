"""Open-set rejection at dataset scale: `python -m bench.openset` (issue 29's acceptance, one command).

CIFAR-10 (../shared/data) with 4 of its 10 classes held out of training (drawn with
``random.Random(0)``: airplane, bird, frog, truck) as the near-unknowns; the photos of ants and
bees (hymenoptera) as the far-unknowns: another kind of picture. The other 6 classes are carved
like bench.budget (1,000 test images per class, seed 0): the 24,000 others are the training data
of a plain ``visiontune train --time 15m`` (the score is chosen and its threshold set there), and
the 6,000 test images are the knowns the score is measured on, beside the 4,000 test images of the
held-out classes and the 245 photos.

Measured: the closed-set accuracy, the share of known test images the stored threshold accepts
(the target is the 95% it was set at), and per candidate score (each fitted the way training fits
the chosen one) the AUROC and FPR at 95% TPR for near and far unknowns.

  python -m bench.openset                 # about 20 min on a 2-core CPU
  python -m bench.openset --time 5m
  python -m bench.openset --splits 0,2,3,4   # the literature's splits, about 20 min each

``--splits`` runs the protocol of the open-set literature instead (Neal et al. 2018, kept by Vaze et
al. 2022, the issue's anchor, whose 0.93 is the mean over them): the five standard choices of 6
known CIFAR-10 classes (``STANDARD_SPLITS``; the first two name the same classes), each trained
and measured as above, and the mean near-unknown AUROC over those run, in its own section.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
from pathlib import Path

from bench.__main__ import ROOT, VT, cpu_flags, machine, unpack
from bench.budget import run as bench_run
from bench.budget import write_results

SECTION = "## Open-set rejection"
SPLITS_SECTION = "## Open-set rejection: the literature's splits"

HELD_OUT = 4
SEED = 0
# The known classes (CIFAR-10's indices) of the five standard splits: osr_splits.py of
# sgvaze/osr_closed_set_all_you_need ('cifar-10-10'), after Neal et al. 2018. Splits 0 and 1 list
# the same six classes in another order.
STANDARD_SPLITS = ((0, 6, 4, 9, 1, 7), (7, 6, 4, 9, 0, 1), (1, 5, 7, 3, 9, 4), (8, 6, 1, 9, 0, 7),
                   (2, 4, 1, 7, 9, 6))


def held_out_classes(classes: list[str]) -> list[str]:
    """The ``HELD_OUT`` classes no model of this bench trains on."""
    return sorted(classes[i] for i in random.Random(SEED).sample(range(len(classes)), HELD_OUT))


def carve(root: Path, work: Path, per_class: int = 1000, split: int | None = None) -> dict[str, Path]:
    """CSV files: ``train`` and ``test`` of the known classes, ``unknown`` (the held-out classes' test carve).

    ``split``: one of ``STANDARD_SPLITS`` names the known classes (else ``held_out_classes``'
    draw); the files are then named after it."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if split is None:
        unknown = set(held_out_classes(classes))
    else:
        unknown = {c for i, c in enumerate(classes) if i not in STANDARD_SPLITS[split]}
    rng = random.Random(SEED)
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "test": [], "unknown": []}
    for cls in classes:
        files = sorted(str(p) for p in (root / cls).iterdir() if p.is_file())
        rng.shuffle(files)
        if cls in unknown:
            rows["unknown"] += [(f, cls) for f in files[:per_class]]
        else:
            rows["test"] += [(f, cls) for f in files[:per_class]]
            rows["train"] += [(f, cls) for f in files[per_class:]]
    out = {}
    for name, items in rows.items():
        out[name] = work / (f"openset-{name}.csv" if split is None else f"openset-split{split}-{name}.csv")
        with open(out[name], "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "label"])
            writer.writerows(items)
    return out


def read_csv(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as fh:
        return [(row["path"], row["label"]) for row in csv.DictReader(fh)]


def candidate_table(run: Path, files: dict[str, Path], far: list[str]) -> list[dict]:
    """Every candidate score (the feature scores on each source of features) fitted as training
    fits the chosen one (the run's own train/val split), measured on the known test images against
    the near and the far unknowns."""
    import torch

    from visiontune.data.scan import read_split_csv
    from visiontune.inference.classifier import Classifier
    from visiontune.models.unknown import FEATURE_SCORES, feature_layer
    from visiontune.training.unknown import (
        MAX_STATS_IMAGES,
        auroc,
        candidates,
        fit_score,
        fpr_at_tpr,
        name,
        stats_subset,
        threshold_at,
    )

    clf = Classifier.load(run, precision="32")
    names = clf.class_names
    train = read_split_csv(run / "splits" / "train.csv", names)
    val = read_split_csv(run / "splits" / "val.csv", names)
    y = torch.tensor([int(t) for _, t in train])
    train = [train[i] for i in stats_subset(y, len(train), MAX_STATS_IMAGES).tolist()]
    test = [(p, names.index(c)) for p, c in read_csv(files["test"])]
    near = [p for p, _ in read_csv(files["unknown"])]
    second = feature_layer(clf.model, clf.card.architecture.classifier, clf.preprocessing.input_size)
    layers = (None,) + ((second,) if second else ())

    def feats(paths):
        f, z, ok = clf.taps_of(paths, layers, 128)
        return {k: v[ok] for k, v in f.items()}, z[ok]

    tr_f, _ = feats([p for p, _ in train])
    tr_y = torch.tensor([int(t) for _, t in train])
    va, te, nr, fr = feats([p for p, _ in val]), feats([p for p, _ in test]), feats(near), feats(far)
    rows = []
    for kind in candidates(False):
        for layer in layers if kind in FEATURE_SCORES else (None,):
            score = fit_score(kind, tr_f[layer], tr_y, len(names), clf.temperature, layer=layer, reference=va[0][layer])
            with torch.no_grad():
                s = {k: score(v[0][layer], v[1]).numpy() for k, v in (("val", va), ("test", te), ("near", nr),
                                                                      ("far", fr))}
            t = threshold_at(s["val"], 0.95)
            rows.append({"score": name({"score": kind, "layer": layer}),
                         "near_auroc": auroc(s["test"], s["near"]), "far_auroc": auroc(s["test"], s["far"]),
                         "near_fpr95": fpr_at_tpr(s["test"], s["near"]), "far_fpr95": fpr_at_tpr(s["test"], s["far"]),
                         "test_accepted": float((s["test"] >= t).mean())})
    return rows


def measure(args: argparse.Namespace, data: dict[str, Path], split: int | None = None) -> dict:
    """Train on one carve (or take ``--run``), then measure its stored score on the near and far
    unknowns with ``visiontune evaluate --unknown`` and every candidate with :func:`candidate_table`."""
    files = carve(data["cifar10"], args.work, split=split)
    tag = "" if split is None else f"-split{split}"
    run, seconds = args.run, None
    if run is None:
        run = args.work / "runs" / f"known-{args.time}{tag}"
        seconds = bench_run([*VT, "train", str(files["train"]), "--time", args.time, "--run-dir", str(run),
                             "--no-progress"], args.work / f"train-{args.time}{tag}.log")
        print(f"train --time {args.time}{tag}: {seconds:.0f} s")
    card = json.loads((run / "model" / "model.json").read_text())
    if seconds is None and (run / "timings.json").is_file():  # a run trained before: its own record
        seconds = json.loads((run / "timings.json").read_text()).get("total")
    if "unknown" not in card:  # a run trained before the unknown-score: fitted as training would
        from visiontune.data.scan import read_split_csv
        from visiontune.inference.classifier import Classifier
        from visiontune.training.unknown import describe, fit_unknown, store_unknown

        clf = Classifier.load(run, precision="32")
        fitted = fit_unknown(clf, read_split_csv(run / "splits" / "train.csv", clf.class_names),
                             read_split_csv(run / "splits" / "val.csv", clf.class_names), batch_size=128)
        store_unknown(run / "model", fitted)
        print(f"fitted after training ({fitted.seconds:.0f} s): {describe(fitted.section)}")
        card = json.loads((run / "model" / "model.json").read_text())
    far_dir = data["hymenoptera"]
    far = sorted(str(p) for p in far_dir.rglob("*.jpg"))
    results = {}
    for kind, unknown in (("near", None), ("far", far_dir)):
        if unknown is None:
            unknown = args.work / f"near-unknown{tag}"
            unknown.mkdir(exist_ok=True)
            for path, _ in read_csv(files["unknown"]):
                link = unknown / f"{Path(path).parent.name}-{Path(path).name}"  # names repeat across classes
                if not link.exists():
                    link.symlink_to(path)
        out = subprocess.run([*VT, "evaluate", str(run), str(files["test"]), "--unknown", str(unknown), "--json",
                              "--no-save"], capture_output=True, text=True, check=True)
        results[kind] = json.loads(out.stdout)
    held = sorted({c for _, c in read_csv(files["unknown"])})
    return {"card": card, "results": results, "table": candidate_table(run, files, far), "seconds": seconds,
            "held_out": held}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/visiontune-bench-openset"))
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--time", default="15m")
    parser.add_argument("--carve-only", action="store_true")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    parser.add_argument("--run", type=Path, help="a run already trained on the carve (its unknown-score is fitted "
                                                 "if it has none)")
    parser.add_argument("--splits", default="", help="comma-separated indices of STANDARD_SPLITS (0-4) to run "
                                                     "instead of this bench's own split")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    data = unpack(args.data, args.work)
    splits = [int(k) for k in args.splits.split(",") if k.strip()]
    if any(not 0 <= k < len(STANDARD_SPLITS) for k in splits) or (splits and args.run):
        parser.error(f"--splits takes indices 0-{len(STANDARD_SPLITS) - 1}, and trains its own runs (no --run)")
    if args.carve_only:
        for split in splits or [None]:
            print({k: str(v) for k, v in carve(data["cifar10"], args.work, split=split).items()})
        return
    if splits:
        measured = {}
        for split in splits:
            measured[split] = measure(args, data, split)
            print(split_row(split, measured[split]))
        text = splits_report(measured, cpu_flags(), f"python -m bench.openset --splits {args.splits}"
                             + (f" --time {args.time}" if args.time != "15m" else ""), args.time)
        print(text)
        write_results(args.results, SPLITS_SECTION, text)
        return
    m = measure(args, data)
    command = ("python -m bench.openset" + (f" --time {args.time}" if args.time != "15m" else "")
               + (" --run RUN (a model trained before; its unknown-score refitted if it had none)" if args.run else ""))
    text = report(m["card"], m["results"], m["table"], cpu_flags(), command, args.time, m["seconds"])
    print(text)
    write_results(args.results, SECTION, text)


def split_row(split: int, m: dict) -> str:
    """One split's line of :func:`splits_report`'s table."""
    from visiontune.training.unknown import name

    near, far = m["results"]["near"], m["results"]["far"]["unknown"]
    best = max(m["table"], key=lambda row: row["near_auroc"])
    return (f"| {split} | {', '.join(m['held_out'])} | {near['accuracy']:.4f} | {name(m['card']['unknown'])} | "
            f"{near['unknown']['auroc']:.4f} | {near['unknown']['fpr_at_95_tpr']:.4f} | {far['auroc']:.4f} | "
            f"{near['unknown']['known_accepted']:.4f} | {best['score']} {best['near_auroc']:.4f} | "
            + (f"{m['seconds'] / 60:.1f} min |" if m["seconds"] else " |"))


def splits_report(measured: dict[int, dict], flags: str, command: str, budget: str) -> str:
    """The standard splits' results: one row per split, and the means over the splits run."""
    where = machine() + ("" if flags in machine() else f" (CPU flags: {flags})")
    lines = [SPLITS_SECTION, "", f"Machine: {where}", "", f"Command: `{command}`", "",
             f"Each split: the 6 known classes' 24,000 training images, `visiontune train TRAIN.csv --time {budget}`; "
             "near-unknowns: the 4,000 carved test images of the 4 held-out classes; far-unknowns: the 245 ants "
             "and bees photos; known: the 6,000 carved test images. The score is the one training chose and stored.",
             "", "| split | held out (near-unknowns) | known test accuracy | score chosen | near AUROC | near FPR95 | "
             "far AUROC | known test accepted | best candidate on near (chosen after the fact) | training |",
             "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    lines += [split_row(split, m) for split, m in measured.items()]

    def mean(values: list[float]) -> str:
        return f"{sum(values) / len(values):.4f}"

    ms = list(measured.values())
    lines += ["", f"Mean over the {len(ms)} split(s) run: known test accuracy "
              f"{mean([m['results']['near']['accuracy'] for m in ms])}, near AUROC "
              f"**{mean([m['results']['near']['unknown']['auroc'] for m in ms])}**, far AUROC "
              f"**{mean([m['results']['far']['unknown']['auroc'] for m in ms])}**, known test images accepted "
              f"{mean([m['results']['near']['unknown']['known_accepted'] for m in ms])}."]
    return "\n".join(lines) + "\n"


def report(card: dict, results: dict, table: list[dict], flags: str, command: str, budget: str,
           train_s: float | None) -> str:
    """The results as the "Open-set rejection" section of RESULTS.md."""
    from visiontune.training.unknown import name

    u = card["unknown"]
    where = machine() + ("" if flags in machine() else f" (CPU flags: {flags})")
    lines = [SECTION, "", f"Machine: {where}", "", f"Command: `{command}`", "",
             "CIFAR-10, 6 known classes (automobile, cat, deer, dog, horse, ship), 24,000 training images; "
             "near-unknowns: the 4,000 carved test images of airplane, bird, frog and truck (never trained on); "
             "far-unknowns: the 245 ants and bees photos (hymenoptera). Known: the 6,000 carved test images.", "",
             f"- training: `visiontune train TRAIN.csv --time {budget}`"
             + (f", {train_s / 60:.1f} min" if train_s else "") + f"; known test accuracy "
             f"{results['near']['accuracy']:.4f}",
             f"- score chosen at training: **{name(u)}**, threshold {u['threshold']:.4g} set at "
             f"{u['tpr']:.0%} of val (val accepted {u['val_accepted']:.4f})"]
    for kind in ("near", "far"):
        r = results[kind]["unknown"]
        lines.append(f"- {kind}: AUROC **{r['auroc']:.4f}**, FPR at 95% TPR {r['fpr_at_95_tpr']:.4f}; at the stored "
                     f"threshold: known test images accepted **{r['known_accepted']:.4f}**, unknown rejected "
                     f"{r['unknown_rejected']:.4f} ({r['num_unknown']} images)")
    lines += ["", "Every candidate, fitted as training fits the chosen one, on the same images:", "",
              "| score | near AUROC | near FPR95 | far AUROC | far FPR95 | known test accepted | "
              "AUROC with classes held out (training's estimate) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    cv = {name(row): row for row in u["selection"]["candidates"]}
    for row in table:
        c = cv.get(row["score"])
        lines.append(f"| {row['score']}{' (chosen)' if row['score'] == name(u) else ''} | {row['near_auroc']:.4f} | "
                     f"{row['near_fpr95']:.4f} | {row['far_auroc']:.4f} | {row['far_fpr95']:.4f} | "
                     f"{row['test_accepted']:.4f} | " + (f"{c['auroc']:.4f} ± {c['std']:.4f}" if c else "") + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
