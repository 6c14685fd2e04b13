"""How far the choice of images to label moves a cross-validated probe: pickers beside oracles.

`python -m bench.suggest_study [--held 200] [--seeds 3] [--rounds 3] [--pool 5000] [--methods ...]`

`bench.unlabelled --only suggest` measures `visiontune suggest` end to end (a whole `train` per
arm and round, minutes each). This study asks the question behind it in minutes: on CIFAR-10 at
100 labelled images per class, how much do 500 picks add over 500 random ones when the retrained
model is a logistic probe on the frozen backbone's features, chosen by cross-validation (the plain
command's plan for small photo sets), and do pickers that know the labels do better?
It runs bench.unlabelled's carve and draws (``--held`` images per class held out with seed 0; each
seed's 100 per class, its pool and its random arm's picks drawn as bench.unlabelled draws them;
suggest's own seed 0) on features extracted once, by the model of bench.unlabelled's round-0 run
of seed 0 (the frozen Lite0 backbone at 128 px that every probe run of the carve shares; trained
first when missing), and fits each round's probe as the command does: its stratified val split
(20%, seed 0) held out, :func:`~visiontune.training.probe_selection.select_probe` over the
feature probes, :func:`~visiontune.training.probe_selection.fit_linear` on the rest. The pickers
are the product's own (:func:`visiontune.pipeline.suggest.rank`, k-center seeded with the
training split's features as suggest seeds it), beside two label-aware heuristics (oracles, not
an upper bound on what a choice can buy):

- ``oracle-wrong``: 500 of the pool images the current probe gets wrong;
- ``oracle-margin``: the 500 images nearest the boundary of a probe (C = 0.01) fitted on 80% of
  every labelled image of the carve (the boundary the retrain is trying to find).

Not modelled: the sparse probes on the backbone's ImageNet logits that the command's selection
also tries (chosen in 2 of 26 such runs), and the calibration temperature (0.83-1.0 in these
runs; it can reorder near-equal margins). The probe is what the command trained on these sets until
the planner weighed a fine-tune for small images (CIFAR-10's 32 px now fine-tune at any count, and
score 7-13 points higher); the study keeps the probe, the learner of small photo sets, which it can
refit in seconds. Up to ``SMALL_DATA`` training images only: beyond them every set fine-tunes.
Results go to stdout and the "## Unlabelled images: what picks can buy" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.__main__ import ROOT, unpack
from bench.budget import publish
from bench.fewshot import cifar_pool, one, write_csv
from bench.unlabelled import gain_table

SECTION = "## Unlabelled images: what picks can buy"
ORACLES = ("oracle-wrong", "oracle-margin")


def features(args) -> tuple[np.ndarray, np.ndarray, int, list[str]]:
    """(features ``[pool + held, D]``, labels, pool size, the pool's paths), cached in the work dir by path."""
    from visiontune.inference.classifier import Classifier

    pool_by_class, held = cifar_pool(unpack(args.data_root, args.work)["cifar10"], args.held)
    files = sorted(os.path.realpath(f) for fs in pool_by_class.values() for f in fs)
    cls_of = {os.path.realpath(f): c for c, fs in pool_by_class.items() for f in fs}
    names = sorted(pool_by_class)
    labels = [cls_of[f] for f in files] + [c for _, c in held]
    files += [os.path.realpath(f) for f, _ in held]
    cache = args.work / "study-features.npz"  # by path: every carve of the same images reuses it
    stored = np.load(cache) if cache.exists() else None
    if stored is None or not set(files) <= set(stored["files"].tolist()):
        run_dir = args.work / "runs" / "s0-r0"
        if not (run_dir / "model" / "model.json").is_file():
            rng = random.Random(0)
            by_class: dict[str, list[str]] = {}
            for f in sorted(cls_of):
                by_class.setdefault(cls_of[f], []).append(f)
            labelled = [f for fs in by_class.values() for f in rng.sample(fs, args.start)]
            one(args.work, "s0-r0", write_csv(args.work / "subsets" / "s0-r0.csv",
                                              [(f, cls_of[f]) for f in labelled]), held)
        clf = Classifier.load(run_dir, precision="32")
        feats, _, ok = clf.features_of(files, 256)
        assert bool(ok.all()), "unreadable images in the carve"
        np.savez(cache, feats=feats.numpy(), files=np.array(files))
        stored = np.load(cache)
    row = {f: i for i, f in enumerate(stored["files"].tolist())}
    x = stored["feats"][[row[f] for f in files]].astype(np.float64)  # as the command's probes fit
    y = np.array([names.index(c) for c in labels])
    return x, y, len(cls_of), files[:len(cls_of)]


class Probe:
    """The cross-validated probe on ``x[idx]`` (the plain command's plan for small photo sets): its val split held
    out, selected and fitted as the command does."""

    def __init__(self, x: np.ndarray, y: np.ndarray, idx: np.ndarray, paths: list[str], seed: int = 0,
                 candidate=None):
        from visiontune.data.scan import stratified_split
        from visiontune.training.probe_selection import fit_linear, select_probe

        train, _ = stratified_split([(paths[i], int(y[i]), int(i)) for i in idx], 0.2, seed)
        rows = np.array([i for _, _, i in train])
        self.train_rows = rows  # in path order, as the run's splits/train.csv lists them
        k = int(y.max()) + 1
        best = candidate or select_probe(x[rows], y[rows], None, seed).best
        w, b = fit_linear(best, x[rows], y[rows], None, k, seed)
        self.weight, self.bias = torch.tensor(w), torch.tensor(b)

    def probs(self, x: np.ndarray) -> torch.Tensor:
        return torch.softmax(torch.tensor(x).float() @ self.weight.T + self.bias, dim=1)


def pick(method: str, probe: Probe, x: np.ndarray, y: np.ndarray, cand: np.ndarray, n: int, seed: int,
         full: list) -> list[int]:
    """Indices into ``cand`` of ``n`` picks by ``method`` (a suggest method or an oracle)."""
    from visiontune.pipeline.suggest import MAX_LABELLED, rank
    from visiontune.task import get_task

    task = get_task("single")
    if method == "random":  # bench.unlabelled's random arm: the same draw from the same list
        chosen = set(random.Random(seed).sample(list(cand), n))
        return [j for j, i in enumerate(cand) if i in chosen]
    p = probe.probs(x[cand])
    if method == "oracle-wrong":
        wrong = np.flatnonzero(p.argmax(1).numpy() != y[cand])
        assert len(wrong) >= n, f"the probe gets only {len(wrong)} pool images wrong: a smaller --add"
        return np.random.default_rng(seed).choice(wrong, n, replace=False).tolist()
    if method == "oracle-margin":
        if not full:  # the boundary a probe on every labelled image of the carve draws (C as at 1,500)
            from visiontune.training.probe_selection import Candidate

            full.append(Probe(x, y, np.arange(len(y)), [str(i) for i in range(len(y))], 0, Candidate("features", 0.01)))
        return task.uncertainty(full[0].probs(x[cand])).argsort(descending=True)[:n].tolist()
    train = list(probe.train_rows)  # suggest seeds k-center with up to MAX_LABELLED training images (its seed 0)
    seen = torch.tensor(x[random.Random(0).sample(train, min(MAX_LABELLED, len(train)))]).float()
    return rank(method, task.uncertainty(p), torch.tensor(x[cand]).float(), seen, n, 4.0, 0,
                scale=task.gradient_if_decided(p)).order


def study(args) -> list[str]:
    from visiontune.training.budget import SMALL_DATA

    most = round(0.8 * (10 * args.start + args.rounds * args.add))
    if most > SMALL_DATA:
        raise SystemExit(f"{most} training images at the last round: beyond {SMALL_DATA} the command fine-tunes "
                         "any set, where this study's probe is no one's plan; fewer --rounds or a smaller --add")
    x, y, n_pool, paths = features(args)
    xp, yp, xh, yh = x[:n_pool], y[:n_pool], x[n_pool:], y[n_pool:]
    methods = [m for m in args.methods.split(",") if m != "random"]  # random is the baseline of every table
    acc: dict[tuple[str, int], list[float]] = {}
    full: list = []
    for seed in range(args.seeds):
        rng = random.Random(seed)  # bench.unlabelled's draw: 100 per class, then the pool from the rest
        by_class: dict[int, list[int]] = {}
        for i in sorted(range(n_pool), key=lambda i: paths[i]):
            by_class.setdefault(int(yp[i]), []).append(i)
        start = [i for c in sorted(by_class) for i in rng.sample(by_class[c], args.start)]
        rest = sorted(set(range(n_pool)) - set(start), key=lambda i: paths[i])
        pool = np.array(rng.sample(rest, args.pool))
        first = Probe(xp, yp, np.array(start), paths, 0)
        a0 = float((first.probs(xh).argmax(1).numpy() == yh).mean())
        for arm in ("random", *methods):
            labelled, probe = np.array(start), first
            acc.setdefault((arm, 0), []).append(a0)
            for r in range(1, args.rounds + 1):
                known = set(labelled.tolist())
                cand = np.array([i for i in pool if i not in known])  # the pool's order, as bench.unlabelled's
                chosen = pick(arm, probe, xp, yp, cand, args.add, 1000 * seed + r, full)
                labelled = np.concatenate([labelled, cand[np.array(chosen)]])
                probe = Probe(xp, yp, labelled, paths, 0)
                acc.setdefault((arm, r), []).append(float((probe.probs(xh).argmax(1).numpy() == yh).mean()))
                print(f"seed {seed} round {r} {arm}: {len(labelled)} labelled, held-out {acc[(arm, r)][-1]:.4f}",
                      flush=True)
    return [f"Start: {args.start} labelled images per class; each round adds {args.add} from a pool of {args.pool}; "
            f"held-out: {len(yh)} images. Held-out accuracy of the retrained probe, mean +- std over "
            f"{args.seeds} seed(s); gain over random paired by seed, in points:", "",
            *gain_table(acc, methods, args.rounds, 10 * args.start, args.add)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "visiontune-bench-unlabelled")
    ap.add_argument("--start", type=int, default=100, help="labelled images per class")
    ap.add_argument("--held", type=int, default=200, help="held-out images per class")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--add", type=int, default=500)
    ap.add_argument("--pool", type=int, default=5000)
    ap.add_argument("--methods", default="margin-kcenter,badge,margin,margin-cluster," + ",".join(ORACLES))
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    torch.set_num_threads(2)
    body = study(args)
    command = (f"python -m bench.suggest_study --start {args.start} --seeds {args.seeds} --rounds {args.rounds} "
               f"--add {args.add} --pool {args.pool} --held {args.held} --methods {args.methods}")
    publish(args.results, SECTION, command, body, began)


if __name__ == "__main__":
    sys.exit(main())
