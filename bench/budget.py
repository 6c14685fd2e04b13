"""Time budgets at dataset scale: `python -m bench.budget` (issue 14's acceptance, one command).

CIFAR-10 (../shared/data): a fixed, stratified 10,000-image test split is carved from the
50,000 training images (1,000 per class, seed 0; never trained on); the other 40,000 are the
training data. For each budget (15, 30, 60 min) the whole `visiontune train --time` command is
timed, its model is evaluated on the test split, and the plan it chose is printed. Beside it,
the seed recipe (bench/seed_recipe.py: frozen backbone at 32 px + new FC, Adam 1e-3,
`model.train()`) runs once for the longest budget and is evaluated on the same test split at
each budget's mark, i.e. after the same wall time.

Hymenoptera (245 images): the plain `visiontune train` (no flag: the default 1h plan) on all of
them (wall time), and its accuracy estimated by repeated stratified 5-fold cross-validation: the
whole command runs on 4/5 of the images and predicts the other 1/5. The out-of-fold probabilities
give the expected calibration error before and after the temperature the run fitted, and the most
confident wrong answer. The same estimate for the fixed recipe (`--time none`: 10 epochs of
fine-tuning at 224 px, what the plain command ran before plans became the default).

Levers: on/off side by side at the same budget (CIFAR-10, a 10,000-image training subset,
5 min each by default): EMA of weights, mixup, flip test-time augmentation; on hymenoptera, flip
TTA on/off on the same out-of-fold models.

Results go to stdout and to the "## Time budgets" section of bench/RESULTS.md.

  python -m bench.budget                       # everything (about 5 h on a 2-core CPU)
  python -m bench.budget --only cifar --budgets 15
  python -m bench.budget --only cifar --budgets 0 --seed-minutes 0   # the plain command, no flag
  python -m bench.budget --only hymenoptera --repeats 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from bench.__main__ import PY, ROOT, VT, cpu_flags, machine, unpack
from visiontune.training.budget import PRECISION_NAMES

SECTION = "## Time budgets"


def carve(root: Path, work: Path, per_class: int = 1000, seed: int = 0) -> tuple[Path, Path]:
    """(train.csv, test.csv): ``per_class`` test images per class drawn with ``seed``, the rest train."""
    rng = random.Random(seed)
    train, test = [], []
    for cls in sorted(p.name for p in root.iterdir() if p.is_dir()):
        files = sorted(str(p) for p in (root / cls).iterdir() if p.is_file())
        rng.shuffle(files)
        test += [(f, cls) for f in files[:per_class]]
        train += [(f, cls) for f in files[per_class:]]
    out = []
    for name, rows in (("train", train), ("test", test)):
        path = work / f"cifar-{name}.csv"
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "label"])
            writer.writerows(rows)
        out.append(path)
    return out[0], out[1]


def run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    """Run ``cmd`` with its output in ``log``; wall seconds. Fails loudly."""
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return seconds


def train(work: Path, name: str, data: Path, *flags: str) -> tuple[float, Path]:
    run_dir = work / "runs" / name
    cache = work / "caches" / name  # a cold feature cache: every run pays for its own features
    for path in (run_dir, cache):
        shutil.rmtree(path, ignore_errors=True)
    seconds = run(VT + ["train", str(data), "--run-dir", str(run_dir), "--no-progress", *flags],
                  work / f"{name}.log", {"VISIONTUNE_CACHE": str(cache)})
    return seconds, run_dir


def test_scores(run_dir: Path, test_csv: Path, *flags: str) -> dict:
    """`visiontune evaluate --json` of the run's model on ``test_csv``."""
    out = subprocess.run(VT + ["evaluate", str(run_dir), str(test_csv), "--json", "--no-save", *flags],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def test_accuracy(run_dir: Path, test_csv: Path, *flags: str) -> float:
    return float(test_scores(run_dir, test_csv, *flags)["accuracy"])


def plan_summary(run_dir: Path) -> str:
    path = run_dir / "plan.json"
    if not path.is_file():
        return "no plan"
    plan = json.loads(path.read_text())
    what = (f"linear probe ({plan['head']})" if plan["strategy"] == "linear-probe"
            else f"{plan['strategy']} {plan['epochs']} ep ({plan['freeze_epochs']} on cached features"
                 + (f"; the last partial: {plan['max_steps']} fine-tuning steps in all" if plan.get("max_steps")
                    else "") + f"), {plan['augment']}")
    recipe = plan.get("recipe", {})
    network = f"{recipe['model']} from scratch, " if recipe.get("model") else ""
    precision = f", {PRECISION_NAMES.get(recipe['precision'], recipe['precision'])}" if recipe.get("precision") else ""
    summary = f"{network}{what} at {plan['img_size']} px{precision}, projected {plan['total'] / 60:.1f} min"
    config = run_dir / "config.yaml"  # the length the run ended with: a re-plan may have changed the plan's
    if config.is_file():
        saved = yaml.safe_load(config.read_text()) or {}
        final = (saved.get("epochs"), saved.get("max_steps"))
        if final != (plan["epochs"], plan.get("max_steps")):
            summary += f"; re-planned to {final[0]} ep" + (f", {final[1]} steps" if final[1] else "")
    return summary


def bench_cifar(work: Path, data: dict, budgets: list[int], seed_minutes: int,
                seed_marks: list[int] | None = None) -> list[str]:
    """visiontune --time at each budget first (the long pole), then the seed recipe once, evaluated at
    each of ``seed_marks`` (minutes; default: the budgets) up to ``seed_minutes``."""
    train_csv, test_csv = carve(data["cifar10"], work)
    rows = []
    for minutes in budgets:  # 0: the plain command, no flag (the default budget)
        name, flags = (f"cifar-{minutes}m", ["--time", f"{minutes}m"]) if minutes else ("cifar-plain", [])
        seconds, run_dir = train(work, name, train_csv, *flags)
        minutes = minutes or round(json.loads((run_dir / "plan.json").read_text())["budget"] / 60)
        scores = test_scores(run_dir, test_csv)
        rows.append((minutes, scores["accuracy"], seconds, plan_summary(run_dir), not flags, scores["ece"]))
        print(f"{minutes} min: test {rows[-1][1]:.4f} (ECE {rows[-1][5]:.4f}) in {seconds / 60:.1f} min "
              f"({rows[-1][3]})", flush=True)
    marks = [m * 60 for m in sorted(set(seed_marks or [r[0] for r in rows])) if m <= seed_minutes]
    seed: dict[int, float] = {}
    if marks:
        run([PY, str(ROOT / "bench" / "seed_recipe.py"), "--train-csv", str(train_csv), "--val-csv",
             str(test_csv), "--test-csv", str(test_csv), "--img-size", "32", "--checkpoints",
             ",".join(map(str, marks)), "--json-out", str(work / "seed-cifar.json")], work / "seed-cifar.log")
        seed = {int(c["mark_s"]): c["test_accuracy"]
                for c in json.loads((work / "seed-cifar.json").read_text())["checkpoints"]}
    lines = ["| budget | visiontune test acc | test ECE (calibrated) | wall (whole command) | plan "
             "| seed recipe test acc, same wall time |", "| ---: | ---: | ---: | ---: | --- | ---: |"]
    for minutes, acc, seconds, plan, plain, ece in rows:
        other = f"{seed[minutes * 60]:.4f}" if minutes * 60 in seed else f"not run (--seed-minutes {seed_minutes})"
        budget = f"no flag (the default {minutes} min)" if plain else f"{minutes} min"
        lines.append(f"| {budget} | {acc:.4f} | {ece:.4f} | {seconds / 60:.1f} min | {plan} | {other} |")
    if seed:
        lines += ["", "Seed recipe, one run evaluated on the held-out split at each mark: "
                  + ", ".join(f"{s // 60} min {a:.4f}" for s, a in sorted(seed.items()))]
    return lines


def bench_levers(work: Path, data: dict, minutes: int, n_train: int) -> list[str]:
    """Each lever on and off at the same budget (the planner's choice for the rest), on a stratified
    ``n_train``-image subset of the training split (so that a short budget still fine-tunes)."""
    train_csv, test_csv = carve(data["cifar10"], work)
    rows = list(csv.reader(open(train_csv)))[1:]
    per_class: dict[str, list[list[str]]] = {}
    for row in rows:
        per_class.setdefault(row[1], []).append(row)
    subset = _write(work / f"cifar-train{n_train}.csv",
                    [tuple(r) for label in sorted(per_class) for r in per_class[label][: n_train // len(per_class)]])
    lines = [f"Levers, CIFAR-10 {n_train} training images, `--time {minutes}m` each, test accuracy on the "
             "10,000 held-out images (the rest as planned):", ""]
    base_seconds, base = train(work, f"lever-base-{minutes}m", subset, "--time", f"{minutes}m")
    plan = json.loads((base / "plan.json").read_text())
    recipe = plan.get("recipe", {})
    card = json.loads((base / "model" / "model.json").read_text())
    tta = (card.get("inference") or {}).get("tta") or "none"
    other = "flip" if tta == "none" else "none"
    acc = test_accuracy(base, test_csv)
    other_tta = test_accuracy(base, test_csv, "--tta", other)
    lines.append(f"- planned ({plan_summary(base)}, ema {recipe.get('ema')}, mixup {recipe.get('mixup')}, "
                 f"tta {tta}): {acc:.4f} in {base_seconds / 60:.1f} min")
    lines.append(f"- the same model, `evaluate --tta {other}`: {other_tta:.4f}")
    print("\n".join(lines[-2:]), flush=True)
    for name, flags in (("ema", ["--no-ema"] if recipe.get("ema") else ["--ema"]),
                        ("mixup", ["--mixup", "0"] if recipe.get("mixup") else ["--mixup", "0.2"])):
        # the base run's plan pinned: a probe that measures a little faster must not buy this run an extra epoch
        pinned = ["--epochs", str(plan["epochs"]), "--img-size", str(plan["img_size"])]
        seconds, run_dir = train(work, f"lever-{name}-{minutes}m", subset, "--time", f"{minutes}m", *pinned, *flags)
        lines.append(f"- `{' '.join(flags)}`: {test_accuracy(run_dir, test_csv):.4f} in {seconds / 60:.1f} min "
                     f"({plan_summary(run_dir)})")
        print(lines[-1], flush=True)
    return lines


def _folds(rows: list[tuple[str, str]], k: int, seed: int) -> list[list[int]]:
    """Stratified k folds of row indices."""
    rng = random.Random(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    by_class: dict[str, list[int]] = {}
    for i, (_, label) in enumerate(rows):
        by_class.setdefault(label, []).append(i)
    offset = 0
    for label in sorted(by_class):
        idx = by_class[label]
        rng.shuffle(idx)
        for j, i in enumerate(idx):
            folds[(j + offset) % k].append(i)
        offset += len(idx)
    return folds


def _write(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return path


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            total += sel.mean() * abs((pred[sel] == labels[sel]).mean() - conf[sel].mean())
    return float(total)


def cross_validate(work: Path, rows: list[tuple[str, str]], name: str, flags: list[str], repeats: int,
                   k: int = 5) -> dict:
    """The whole `visiontune train` command on k-1 folds, predictions on the held-out fold."""
    import visiontune

    accs, probs, uncal, labels, walls, other_accs, tta_on = [], [], [], [], [], [], False
    for r in range(repeats):
        for f, held in enumerate(_folds(rows, k, seed=r)):
            held_set = set(held)
            fold_dir = work / "folds" / f"{name}-r{r}f{f}"
            fold_dir.mkdir(parents=True, exist_ok=True)
            train_csv = _write(fold_dir / "train.csv", [rows[i] for i in range(len(rows)) if i not in held_set])
            seconds, run_dir = train(work, f"cv-{name}-r{r}f{f}", train_csv, *flags)
            walls.append(seconds)
            model = visiontune.load(run_dir)
            logits, ok, _ = model.logits_of([rows[i][0] for i in held])
            assert bool(ok.all()), "every hymenoptera image is readable"
            y = np.asarray([model.class_names.index(rows[i][1]) for i in held])
            p = torch.softmax(logits / model.card.temperature, 1).numpy()
            q = torch.softmax(logits, 1).numpy()  # before the temperature
            accs.append(float((p.argmax(1) == y).mean()))
            probs.append(p), uncal.append(q), labels.append(y)
            flipped = visiontune.load(run_dir, tta="none" if model.card.tta else "flip")  # the other setting
            other_logits, _, _ = flipped.logits_of([rows[i][0] for i in held])
            other_accs.append(float((other_logits.argmax(1).numpy() == y).mean()))
            tta_on = not model.card.tta  # whether the other setting is the one with TTA
    p, q, y = np.concatenate(probs), np.concatenate(uncal), np.concatenate(labels)
    wrong = p.argmax(1) != y
    return {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "folds": len(accs),
            "ece_calibrated": ece(p, y), "ece_uncalibrated": ece(q, y),
            "max_wrong_p": float(p.max(1)[wrong].max()) if wrong.any() else 0.0, "errors": int(wrong.sum()),
            "n": len(y), "mean_wall_s": float(np.mean(walls)), "other_tta_mean": float(np.mean(other_accs)),
            "other_tta": "on" if tta_on else "off"}


def bench_hymenoptera(work: Path, data: dict, repeats: int, default_repeats: int) -> list[str]:
    root = data["hymenoptera"]
    rows = [(str(p), p.parent.name) for p in sorted(root.glob("*/*")) if p.is_file()]
    seconds, run_dir = train(work, "hym-plain", root)
    lines = [f"Hymenoptera ({len(rows)} images): the plain `visiontune train hymenoptera/train` (no flag) took "
             f"{seconds / 60:.2f} min ({plan_summary(run_dir)}).", ""]
    for name, flags, reps in (("plain", [], repeats), ("fixed-recipe", ["--time", "none"], default_repeats)):
        saved = work / f"cv-{name}.json"
        if reps:
            res = cross_validate(work, rows, name, flags, reps)
            saved.write_text(json.dumps(res))
        elif saved.is_file():  # not rerun: the last measurement in this work dir, said so
            res = {**json.loads(saved.read_text()), "earlier": True}
        else:
            continue
        lines.append(f"- `{' '.join(flags) or 'no flag'}`: repeated stratified 5-fold ({res['folds']} folds) "
                     f"accuracy {res['mean']:.4f} +- {res['std']:.4f}; out-of-fold ECE {res['ece_uncalibrated']:.4f} "
                     f"uncalibrated -> {res['ece_calibrated']:.4f} with the run's temperature; {res['errors']} "
                     f"wrong of {res['n']}, most confident wrong p = {res['max_wrong_p']:.4f}; "
                     f"{res['mean_wall_s']:.0f} s per run; the same models with TTA {res['other_tta']} "
                     f"(the other setting): {res['other_tta_mean']:.4f}"
                     + (" (an earlier run of this bench)" if res.get("earlier") else ""))
        print(lines[-1], flush=True)
    return lines


def publish(results: Path, title: str, command: str, lines: list[str], started: float) -> None:
    """Print a bench's section (the machine, the command, ``lines``, its minutes since ``started``, a
    ``time.perf_counter()``, and the CPU flags) and put it under ``title`` in RESULTS.md."""
    text = "\n".join([title, "", f"Machine: {machine()}", "", f"Command: `{command}`", "", *lines, "",
                      f"Took {(time.perf_counter() - started) / 60:.0f} min (CPU flags: {cpu_flags()})"]) + "\n"
    print(text, flush=True)
    write_results(results, title, text)


def write_results(results: Path, heading: str, text: str) -> None:
    """Replace the section under ``heading`` (or append it) in RESULTS.md."""
    old = results.read_text() if results.exists() else ""
    if f"{heading}\n" in old:
        start = old.index(f"{heading}\n")
        end = old.find("\n## ", start + len(heading))
        old = old[:start] + old[end + 1:] if end != -1 else old[:start]
    results.write_text(old.rstrip("\n") + "\n\n" + text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "visiontune-bench-budget")
    ap.add_argument("--only", default="cifar,hymenoptera,levers")
    ap.add_argument("--budgets", default="15,30,60",
                    help="minutes, comma-separated; 0 runs the plain command (no flag: the default budget)")
    ap.add_argument("--seed-minutes", type=int, default=60,
                    help="run the seed recipe (once, evaluated at each mark) for the marks up to this")
    ap.add_argument("--seed-marks", default="",
                    help="minutes at which the seed run is evaluated, comma-separated (default: --budgets)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="repeats of the 5-fold CV of the plain command (hymenoptera)")
    ap.add_argument("--default-repeats", type=int, default=1,
                    help="the same for the fixed recipe, --time none (0: skip)")
    ap.add_argument("--levers-minutes", type=int, default=5, help="the budget of each levers run")
    ap.add_argument("--levers-train", type=int, default=10_000, help="training images of the levers runs")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    data = unpack(args.data_root, args.work)
    parts = args.only.split(",")
    command = (f"python -m bench.budget --only {{part}} --budgets {args.budgets} "
               f"--seed-minutes {args.seed_minutes} "
               + (f"--seed-marks {args.seed_marks} " if args.seed_marks else "") +
               f"--repeats {args.repeats} --default-repeats {args.default_repeats} "
               f"--levers-minutes {args.levers_minutes} --levers-train {args.levers_train}")
    benches = {"cifar": lambda: bench_cifar(args.work, data, [int(b) for b in args.budgets.split(",")],
                                            args.seed_minutes,
                                            [int(m) for m in args.seed_marks.split(",") if m]),
               "hymenoptera": lambda: bench_hymenoptera(args.work, data, args.repeats, args.default_repeats),
               "levers": lambda: bench_levers(args.work, data, args.levers_minutes, args.levers_train)}
    unknown = set(parts) - set(benches)
    if unknown:
        ap.error(f"--only takes {', '.join(benches)}, not {', '.join(sorted(unknown))}")
    for part in parts:  # each part has its own section, so parts can be rerun one at a time
        start = time.perf_counter()
        lines = benches[part]()
        # a cifar run over other budgets than the default gets its own section, beside the default's
        other_budgets = part == "cifar" and args.budgets != "15,30,60"
        shown = ",".join("no flag" if b == "0" else b for b in args.budgets.split(","))
        title = f"{SECTION}: {part}" + (f" {shown}" + (" min" if shown[-1].isdigit() else "") if other_budgets else "")
        publish(args.results, title, command.format(part=part), lines, start)


if __name__ == "__main__":
    sys.exit(main())
