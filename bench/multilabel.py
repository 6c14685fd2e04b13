"""Multi-label at real-photo scale: `python -m bench.multilabel` (issue 15's benchmark, one command).

2x2 mosaics of CIFAR-10 training images from ../shared/data, 64x64 px; a mosaic's label set is
the distinct classes among its four tiles (1 to 4 labels). The 50,000 images are first split
into two disjoint tile pools (seeded): 20,000 training mosaics are drawn from a 40,000-image
pool and 4,000 held-out mosaics from the other 10,000, so no held-out tile is ever trained on.

Side by side on the held-out mosaics, each with the wall time of its whole command:

- visiontune: `visiontune train train.csv --time 30m` (the planner's choice), evaluated with
  `visiontune evaluate`; macro-F1 at the tuned per-label thresholds vs a flat 0.5 on the same
  probabilities.
- the baseline: one-vs-rest logistic regression (scikit-learn) on frozen pooled features of the
  same pretrained backbone at its default input size, in plain PyTorch.

Results go to stdout and to the "## Multi-label" section of bench/RESULTS.md.

  python -m bench.multilabel                  # about 45 min on a 2-core CPU
  python -m bench.multilabel --budget 5m --train 4000 --test 1000   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.__main__ import PY, ROOT, VT, cpu_flags, machine, unpack
from bench.budget import run, write_results

SECTION = "## Multi-label"
TILE = 32


def build_mosaics(cifar: Path, work: Path, n_train: int, n_test: int, seed: int = 0) -> tuple[Path, Path]:
    """(train.csv, test.csv) of ``path,labels`` rows; mosaics written as JPEG under ``work``."""
    files = sorted((c.name, str(p)) for c in cifar.iterdir() if c.is_dir() for p in sorted(c.glob("*.jpg")))
    rng = random.Random(seed)
    rng.shuffle(files)
    test_pool, train_pool = files[:len(files) // 5], files[len(files) // 5:]
    out = []
    for name, pool, count in (("train", train_pool, n_train), ("test", test_pool, n_test)):
        folder = work / f"mosaics-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        csv_path = work / f"mosaic-{name}.csv"
        with open(csv_path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "labels"])
            for i in range(count):
                tiles = rng.sample(pool, 4)
                canvas = Image.new("RGB", (2 * TILE, 2 * TILE))
                for k, (_, path) in enumerate(tiles):
                    with Image.open(path) as img:
                        canvas.paste(img.convert("RGB").resize((TILE, TILE)), ((k % 2) * TILE, (k // 2) * TILE))
                target = folder / f"{i:05d}.jpg"
                if not target.exists():
                    canvas.save(target, quality=95)
                writer.writerow([str(target), " ".join(sorted({label for label, _ in tiles}))])
        out.append(csv_path)
    return out[0], out[1]


def read_rows(csv_path: Path) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(open(csv_path)))[1:]
    return [r[0] for r in rows], [r[1].split() for r in rows]


def multi_hot(labels: list[list[str]], names: list[str]) -> torch.Tensor:
    index = {n: i for i, n in enumerate(names)}
    y = torch.zeros(len(labels), len(names))
    for row, ls in enumerate(labels):
        y[row, [index[x] for x in ls]] = 1
    return y


def bench_visiontune(work: Path, train_csv: Path, test_csv: Path, budget: str) -> dict:
    run_dir = work / "runs" / f"mosaic-{budget}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    seconds = run(VT + ["train", str(train_csv), "--run-dir", str(run_dir), "--no-progress", "--time", budget],
                  work / f"mosaic-{budget}.log", {"VISIONTUNE_CACHE": str(work / "caches" / f"mosaic-{budget}")})
    log = work / f"mosaic-{budget}-evaluate.json"
    run(VT + ["evaluate", str(run_dir), str(test_csv), "--json", "--no-save"], log)
    result = json.loads(log.read_text())
    # the same probabilities decided at a flat 0.5: what the tuned thresholds buy
    import visiontune
    from visiontune.evaluation.multilabel_metrics import multilabel_metrics

    clf = visiontune.load(run_dir)
    paths, labels = read_rows(test_csv)
    logits, ok, _ = clf.logits_of(paths, 128)
    probs = torch.sigmoid(logits[ok] / clf.temperature)
    target = multi_hot([lab for lab, good in zip(labels, ok) if good], clf.class_names)
    flat = multilabel_metrics(probs, target, clf.class_names, [0.5] * len(clf.class_names))
    plan = json.loads((run_dir / "plan.json").read_text()) if (run_dir / "plan.json").is_file() else {}
    return {"seconds": seconds, "macro_map": result["macro_map"], "micro_f1": result["micro_f1"],
            "macro_f1": result["macro_f1"], "macro_f1_flat": flat["macro_f1"], "micro_f1_flat": flat["micro_f1"],
            "subset_accuracy": result["subset_accuracy"],
            "plan": (f"{plan.get('strategy')} {plan.get('epochs')} ep at {plan.get('img_size')} px"
                     if plan else "no plan")}


def bench_baseline(work: Path, train_csv: Path, test_csv: Path) -> dict:
    """One-vs-rest logistic regression on frozen features, timed in a subprocess of its own."""
    out = work / "mosaic-baseline.json"
    run([PY, "-m", "bench.multilabel", "--baseline-only", "--train-csv", str(train_csv), "--test-csv",
         str(test_csv), "--json-out", str(out)], work / "mosaic-baseline.log")
    return json.loads(out.read_text())


def baseline(train_csv: Path, test_csv: Path) -> dict:
    """Frozen pooled features of the default backbone at its input size -> OvR logistic regression."""
    start = time.perf_counter()
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler
    from torchmetrics.functional.classification import multilabel_average_precision, multilabel_f1_score

    from visiontune.data.preprocess import preprocess
    from visiontune.models.factory import build_model

    model, _, pre = build_model("efficientnet_lite0", 10)
    model.eval()

    @torch.inference_mode()
    def features(paths: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(paths), 64):
            batch = torch.stack([torch.from_numpy(preprocess(Image.open(p).convert("RGB"), pre))
                                 for p in paths[i:i + 64]])
            out.append(model.forward_head(model.forward_features(batch), pre_logits=True).numpy())
        return np.concatenate(out)

    train_paths, train_labels = read_rows(train_csv)
    test_paths, test_labels = read_rows(test_csv)
    names = sorted({x for ls in train_labels for x in ls})
    x_train, x_test = features(train_paths), features(test_paths)
    scaler = StandardScaler().fit(x_train)
    clf = OneVsRestClassifier(LogisticRegression(C=1.0, max_iter=2000)).fit(
        scaler.transform(x_train), multi_hot(train_labels, names).numpy())
    probs = torch.from_numpy(clf.predict_proba(scaler.transform(x_test))).float()
    target = multi_hot(test_labels, names).int()
    n = len(names)
    return {"seconds": time.perf_counter() - start,
            "macro_map": float(multilabel_average_precision(probs, target, num_labels=n, average="macro")),
            "micro_f1": float(multilabel_f1_score(probs, target, num_labels=n, average="micro")),
            "macro_f1": float(multilabel_f1_score(probs, target, num_labels=n, average="macro")),
            "input": f"{pre.height} px"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "visiontune-bench-budget",
                    help="work folder (shared with bench.budget: CIFAR-10 is unpacked once)")
    ap.add_argument("--budget", default="30m", help="visiontune train --time")
    ap.add_argument("--train", type=int, default=20_000, help="training mosaics")
    ap.add_argument("--test", type=int, default=4_000, help="held-out mosaics")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    ap.add_argument("--baseline-only", action="store_true", help=argparse.SUPPRESS)  # the timed subprocess
    ap.add_argument("--train-csv", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--test-csv", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.baseline_only:
        args.json_out.write_text(json.dumps(baseline(args.train_csv, args.test_csv)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    data = unpack(args.data_root, args.work)
    started = time.perf_counter()
    train_csv, test_csv = build_mosaics(data["cifar10"], args.work, args.train, args.test)
    labels = [len(ls) for ls in read_rows(train_csv)[1]]
    print(f"mosaics: {args.train} train / {args.test} held-out, labels per mosaic "
          + ", ".join(f"{k}: {labels.count(k)}" for k in range(1, 5)), flush=True)
    vt = bench_visiontune(args.work, train_csv, test_csv, args.budget)
    print(f"visiontune: {vt}", flush=True)
    base = bench_baseline(args.work, train_csv, test_csv)
    print(f"baseline: {base}", flush=True)
    lines = [f"Machine: {machine()}", "",
             f"Command: `python -m bench.multilabel --budget {args.budget} --train {args.train} "
             f"--test {args.test}`", "",
             f"{args.train} training / {args.test} held-out 2x2 mosaics of CIFAR-10 train images (64 px, 1-4 labels; "
             "disjoint tile pools)", "",
             "| | held-out macro mAP | micro-F1 | macro-F1 | wall (whole command) | what |",
             "| --- | ---: | ---: | ---: | ---: | --- |",
             f"| visiontune `--time {args.budget}` | {vt['macro_map']:.4f} | {vt['micro_f1']:.4f} | "
             f"{vt['macro_f1']:.4f} | {vt['seconds'] / 60:.1f} min | {vt['plan']}, thresholds tuned on val |",
             f"| same model, flat 0.5 thresholds | | {vt['micro_f1_flat']:.4f} | {vt['macro_f1_flat']:.4f} | | |",
             f"| OvR logistic regression, frozen features | {base['macro_map']:.4f} | {base['micro_f1']:.4f} | "
             f"{base['macro_f1']:.4f} | {base['seconds'] / 60:.1f} min | {base['input']} input, threshold 0.5 |", "",
             f"Took {(time.perf_counter() - started) / 60:.0f} min (CPU flags: {cpu_flags()})"]
    text = "\n".join([SECTION, "", *lines]) + "\n"
    print(text, flush=True)
    write_results(args.results, SECTION, text)


if __name__ == "__main__":
    main()
