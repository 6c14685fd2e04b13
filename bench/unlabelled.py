"""Learning from unlabelled images: self-training (`train --unlabeled`) and `visiontune suggest`.

`python -m bench.unlabelled [--only pseudo,suggest] [--minutes 30] [--seeds 3] [--rounds 1] [--pool 5000]`

CIFAR-10 (../shared/data), carved like bench.fewshot: ``--held`` images per class (200) held out
(seed 0), never trained on; ``--start`` images per class (seed 0) are the labelled set.

- **pseudo**: the labelled set alone, `visiontune train --time M`, beside the same command with
  `--unlabeled DIR`, DIR holding ``--unlabelled`` other training images (their labels unused).
- **suggest**: for each seed, ``--pool`` other images are the unlabelled pool. Each round, one arm
  per method (``--methods``) labels the ``--add`` images `visiontune suggest --method M` picks, and
  one the ``--add`` images drawn at random from the same pool; the labels come from the carve (an
  oracle); every arm retrains with the plain command and is scored on the held-out images.

Results go to stdout and the "## Unlabelled images" section of bench/RESULTS.md (each part its own
table, a part not run keeps its earlier table).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.__main__ import ROOT, cpu_flags, machine, unpack
from bench.budget import run, write_results
from bench.fewshot import cifar_pool, held_out_accuracy, one, write_csv

SECTION = "## Unlabelled images"


def pool_folder(folder: Path, files: list[str]) -> Path:
    """A folder of links to ``files`` (suggest reads a folder): names keep the order."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for i, f in enumerate(files):
        (folder / f"{i:06d}.jpg").symlink_to(f)
    return folder


def suggest(work: Path, run_dir: Path, pool: list[str], n: int, name: str, method: str) -> list[str]:
    folder = pool_folder(work / "pools" / name, pool)
    out = work / "suggestions" / name
    run([sys.executable, "-m", "visiontune.cli", "suggest", str(run_dir), str(folder), "--n", str(n),
         "--method", method, "--out", str(out)], work / f"{name}-suggest.log")
    import csv

    return [os.path.realpath(r["path"]) for r in csv.DictReader(open(out / "suggestions.csv"))]


def carve(args) -> tuple[dict[str, str], list[str], list[tuple[str, str]]]:
    """(label of every pool image by real path, the labelled images, the held-out rows)."""
    pool_by_class, held = cifar_pool(unpack(args.data_root, args.work)["cifar10"], args.held)
    label_of = {os.path.realpath(f): cls for cls, files in pool_by_class.items() for f in files}
    rng = random.Random(0)
    labelled = [os.path.realpath(f) for files in pool_by_class.values() for f in rng.sample(files, args.start)]
    return label_of, labelled, held


def bench_pseudo(args, label_of: dict[str, str], labelled: list[str], held: list[tuple[str, str]]) -> list[str]:
    rest = sorted(set(label_of) - set(labelled))
    unlabelled = random.Random(1).sample(rest, min(args.unlabelled, len(rest)))
    folder = pool_folder(args.work / "pools" / "unlabelled", unlabelled)
    csv_path = write_csv(args.work / "subsets" / "labelled.csv", [(f, label_of[f]) for f in labelled])
    budget = ("--time", f"{args.minutes}m")
    kept = args.work / "runs" / "pseudo-labelled-only"
    if args.reuse_alone and (kept / "timings.json").is_file():  # the same carve and command: reused, not rerun
        alone, alone_s = held_out_accuracy(kept, held), json.loads((kept / "timings.json").read_text())["total"]
        print(f"labelled only (reused from {kept}): held-out accuracy {alone:.4f} in {alone_s:.0f} s", flush=True)
    else:
        alone, alone_s = one(args.work, "pseudo-labelled-only", csv_path, held, *budget)
        print(f"labelled only: held-out accuracy {alone:.4f} in {alone_s:.0f} s", flush=True)
    both, both_s = one(args.work, "pseudo-self-training", csv_path, held, *budget, "--unlabeled", str(folder))
    print(f"with --unlabeled: held-out accuracy {both:.4f} in {both_s:.0f} s", flush=True)
    run_dir = args.work / "runs" / "pseudo-self-training"
    facts = json.loads((run_dir / "self_training.json").read_text())
    # each model of the run on the held-out images: what the val split's choice could not see
    parts = {part: held_out_accuracy(run_dir / part, held) for part in ("teacher", "student")
             if (run_dir / part / "model" / "model.json").is_file()}
    fallback = facts.get("fallback", "").replace(str(run_dir), "RUN")
    return [f"Labelled: {len(labelled)} images ({args.start} per class); unlabelled: {len(unlabelled)} other "
            f"training images (labels unused). Held-out: {len(held)} images. Budget `--time {args.minutes}m` "
            "for both commands.", "",
            "| command | held-out accuracy | whole command |", "| --- | ---: | ---: |",
            f"| `visiontune train labelled.csv --time {args.minutes}m` | {alone:.4f} | {alone_s / 60:.1f} min |",
            f"| ... `--unlabeled DIR` | {both:.4f} | {both_s / 60:.1f} min |", "",
            f"Gain: {100 * (both - alone):+.2f} points. Self-training: {facts['scored']} images scored, "
            f"{facts['pseudo_labels']} pseudo-labels kept (threshold {facts['threshold']}), teacher val "
            f"{facts['teacher_val']:.4f}, student val {facts.get('student_val', float('nan')):.4f}, kept: "
            f"{facts['kept']}" + (f" ({fallback})" if fallback else "") + ". Held-out, each model: "
            + ", ".join(f"{part} {acc:.4f}" for part, acc in parts.items()) + "."]


def bench_suggest(args, label_of: dict[str, str], held: list[tuple[str, str]]) -> list[str]:
    by_class: dict[str, list[str]] = {}
    for f, cls in sorted(label_of.items()):
        by_class.setdefault(cls, []).append(f)
    acc: dict[tuple[str, int], list[float]] = {}
    for seed in range(args.seeds):
        rng = random.Random(seed)
        labelled = [f for files in by_class.values() for f in rng.sample(files, args.start)]
        pool = rng.sample(sorted(set(label_of) - set(labelled)), args.pool)
        arms = {arm: list(labelled) for arm in (*args.methods.split(","), "random")}
        name = f"s{seed}-r0"
        a, secs = one(args.work, name, write_csv(args.work / "subsets" / f"{name}.csv",
                                                 [(f, label_of[f]) for f in labelled]), held)
        runs = {arm: args.work / "runs" / name for arm in arms}
        for arm in arms:
            acc.setdefault((arm, 0), []).append(a)
        print(f"seed {seed} round 0: {len(labelled)} labelled, held-out accuracy {a:.4f} ({secs:.0f} s)", flush=True)
        for r in range(1, args.rounds + 1):
            for arm in arms:
                known = set(arms[arm])
                left = [f for f in pool if f not in known]
                name = f"s{seed}-r{r}-{arm}"
                picks = (random.Random(1000 * seed + r).sample(left, args.add) if arm == "random"
                         else suggest(args.work, runs[arm], left, args.add, name, arm))
                arms[arm] += picks
                a, secs = one(args.work, name, write_csv(args.work / "subsets" / f"{name}.csv",
                                                         [(f, label_of[f]) for f in arms[arm]]), held)
                runs[arm] = args.work / "runs" / name
                acc.setdefault((arm, r), []).append(a)
                print(f"seed {seed} round {r} {arm}: {len(arms[arm])} labelled, held-out accuracy {a:.4f} "
                      f"({secs:.0f} s)", flush=True)

    methods = args.methods.split(",")
    return [f"Start: {args.start} labelled images per class; each round labels {args.add} more from a pool of "
            f"{args.pool} unlabelled images, picked by `visiontune suggest --method M` or at random, and "
            f"retrains with the plain command. Held-out accuracy ({len(held)} images), mean +- std over "
            f"{args.seeds} seed(s); each "
            "method's gain over random is paired by seed, in points:", "",
            *gain_table(acc, methods, args.rounds, 10 * args.start, args.add)]


def gain_table(acc: dict[tuple[str, int], list[float]], methods: list[str], rounds: int, start: int, add: int
               ) -> list[str]:
    """The rounds' table: random's accuracy, and each method's beside its gain over random paired by seed.

    ``acc[(arm, round)]`` holds one accuracy per seed, in seed order; ``start`` images labelled at round 0."""
    def cell(values: list[float]) -> str:
        spread = f" +- {statistics.stdev(values):.4f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.4f}{spread}"

    lines = ["| round | labelled | random | " + " | ".join(f"`{m}` (gain)" for m in methods) + " |",
             "| ---: | ---: | ---: | " + " | ".join("---:" for _ in methods) + " |"]
    for r in range(rounds + 1):
        rnd = acc[("random", r)]
        cells = []
        for m in methods:
            gains = [100 * (x - y) for x, y in zip(acc[(m, r)], rnd)]
            spread = f" +- {statistics.stdev(gains):.2f}" if len(gains) > 1 else ""
            cells.append(f"{cell(acc[(m, r)])} ({statistics.mean(gains):+.2f}{spread})")
        lines.append(f"| {r} | {start + r * add} | {cell(rnd)} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "visiontune-bench-unlabelled")
    ap.add_argument("--only", default="pseudo,suggest")
    ap.add_argument("--start", type=int, default=100, help="labelled images per class")
    ap.add_argument("--held", type=int, default=200, help="held-out images per class (never trained on, never in a "
                                                          "pool); 1000 narrows a 0.73 accuracy's spread to ~0.4 pt")
    ap.add_argument("--minutes", type=int, default=30, help="pseudo: the budget of both commands")
    ap.add_argument("--unlabelled", type=int, default=39_000, help="pseudo: unlabelled images")
    ap.add_argument("--reuse-alone", action="store_true",
                    help="pseudo: reuse the labelled-only run of an earlier bench in --work (its held-out accuracy "
                         "is measured again; its time is its timings.json total) and run only --unlabeled")
    ap.add_argument("--seeds", type=int, default=3, help="suggest: seeds")
    ap.add_argument("--rounds", type=int, default=1, help="suggest: rounds")
    ap.add_argument("--add", type=int, default=500, help="suggest: images labelled per round")
    ap.add_argument("--pool", type=int, default=5000, help="suggest: unlabelled images suggest and random draw from")
    ap.add_argument("--methods", default="margin-kcenter,margin-cluster,margin", help="suggest: methods compared")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    label_of, labelled, held = carve(args)
    old = args.results.read_text() if args.results.exists() else ""
    parts = {}
    for part in ("pseudo", "suggest"):
        heading = f"### {part}"
        if part in args.only.split(","):
            start = time.perf_counter()
            body = (bench_pseudo(args, label_of, labelled, held) if part == "pseudo"
                    else bench_suggest(args, label_of, held))
            command = (f"python -m bench.unlabelled --only {part} --start {args.start} "
                       + (f"--held {args.held} " if args.held != 200 else "")
                       + (f"--minutes {args.minutes} --unlabelled {args.unlabelled}"
                          + (" --reuse-alone" if args.reuse_alone else "") if part == "pseudo" else
                          f"--seeds {args.seeds} --rounds {args.rounds} --add {args.add} --pool {args.pool} "
                          f"--methods {args.methods}"))
            parts[part] = "\n".join([heading, "", f"Machine: {machine()}", "", f"Command: `{command}`", "", *body, "",
                                     f"Took {(time.perf_counter() - start) / 60:.0f} min (CPU flags: {cpu_flags()})"])
            print(parts[part], flush=True)
        elif heading + "\n" in old:  # kept from the previous results
            start = old.index(heading + "\n")
            end = min([i for i in (old.find("\n### ", start + 1), old.find("\n## ", start + 1)) if i != -1],
                      default=len(old))
            parts[part] = old[start:end].strip("\n")
    text = "\n\n".join([SECTION, "CIFAR-10; each part's held-out images are never trained on and never in a pool.",
                         *parts.values()]) + "\n"
    write_results(args.results, SECTION, text)


if __name__ == "__main__":
    sys.exit(main())
