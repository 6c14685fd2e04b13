"""``visiontune suggest RUN POOL --n N``: which unlabelled images to label next.

The run's model scores every image of the pool. The default method, ``margin-kcenter``, keeps the
``candidates x N`` images it is least sure of (:meth:`~visiontune.task.Task.uncertainty`: for a
single-label model one minus the margin between its two most probable classes) and picks N of
them by k-center greedy on the classifier's input features: each pick is the short-listed image
farthest (cosine) from every labelled image and every earlier pick. The N images are then both
uncertain and unlike each other and the labelled set: an uncertainty short-list diversified like
the core-set method (Sener & Savarese 2018), as in cluster-margin (Citovsky et al. 2021).
``badge`` (Ash et al. 2020) embeds each image as the last layer's gradient were it labelled as the
model decides (:meth:`~visiontune.task.Task.gradient_if_decided` times the features: long where the
model is unsure) and picks by k-means++ seeding on those embeddings: uncertain and diverse in one
step, without a short-list. ``margin``, ``kcenter`` and ``random`` are the single ingredients, for
comparison.

Images the run was trained, validated or tested on (its ``splits/``) are left out of the pool.
The picks go to ``suggestions.csv`` (rank, path, uncertainty, predicted label, distance, why)
and ``suggestions.html`` (the picks as a gallery), in ``--out`` (default ``RUN/suggestions``).

Example:
    >>> import torch
    >>> feats = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [0.7, 0.7]])
    >>> uncertainty = torch.tensor([0.9, 0.8, 0.7, 0.1])
    >>> rank("margin", uncertainty, feats, None, n=2, candidates=2.0, seed=0).order  # the two least sure
    [0, 1]
    >>> rank("margin-kcenter", uncertainty, feats, None, n=2, candidates=1.5, seed=0).order  # ... and unlike
    [0, 2]
    >>> scale = torch.tensor([[0.5, -0.5], [0.4, -0.4], [-0.3, 0.3], [0.01, -0.01]])  # probabilities - decision
    >>> badge(scale, feats, n=3, seed=0).order[0]  # the longest gradient first; the rest drawn
    0
"""

from __future__ import annotations

import csv
import html
import io
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.errors import ConfigError, DataError
from ..core.options import option
from ..core.registry import Registry
from ..core.safe_io import atomic_write_text, refuse_link, spreadsheet_safe
from .scoring import BatchOptions

SUGGEST_METHODS = Registry.choices("suggest method", {
    "margin-kcenter": "the least sure images, diversified by k-center greedy on the features (default)",
    "margin-cluster": "the least sure images, clustered (k-means on the features): the least sure of each cluster",
    "badge": "k-means++ on the last layer's gradients were each image labelled as predicted (Ash et al. 2020)",
    "margin": "the images the model is least sure of",
    "kcenter": "k-center greedy on the features of the whole pool (the core-set method)",
    "random": "a uniform sample (the baseline to beat)",
})
MAX_LABELLED = 2000  # labelled images whose features seed the k-center (a sample beyond this)
CSV_COLUMNS = ["rank", "path", "uncertainty", "predicted", "probability", "distance", "why"]

_positive = (lambda v: v >= 1, "must be >= 1")


@dataclass
class SuggestOptions(BatchOptions):
    """Every option of ``visiontune suggest`` and :func:`suggest`."""

    n: int = option(100, "images to suggest (100)", metavar="N", check=_positive)
    method: str = option("margin-kcenter", "how to pick them", choices=SUGGEST_METHODS)
    candidates: float = option(4.0, "margin-kcenter, margin-cluster: the short-list of the N x C least sure images (4)",
                               metavar="C", check=(lambda v: v >= 1, "must be >= 1"))
    out: str | None = option(None, "folder for suggestions.csv and suggestions.html (default: RUN/suggestions)",
                             metavar="DIR")
    seed: int = option(0, "seed of the random, badge and margin-cluster methods and of the labelled images "
                              "sampled for k-center (0)")
    csv_safe: bool = option(False, "prefix CSV cells starting with = + - @ with ' so spreadsheets show them as "
                                   "text, not formulas (file or class names from strangers)")


@dataclass
class Ranking:
    """The picks, in order: pool indices, and each pick's distance when it was picked: k-center's
    cosine distance to the nearest labelled image or earlier pick, ``badge``'s gradient embedding's
    to the nearest earlier pick (None where the method ignores features, and for badge's first)."""

    order: list[int]
    distance: list[float | None]


@dataclass
class Suggestions:
    """What :func:`suggest` did: the rows written, where, and what it left out of the pool."""

    rows: list[dict[str, Any]]
    csv: Path
    html: Path
    pool: int
    excluded: int
    unreadable: int


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=1)


def nearest_distance(points: torch.Tensor, centres: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Cosine distance ``[n]`` from each (unit) row of ``points`` to the nearest (unit) row of ``centres``."""
    out = torch.empty(len(points))
    for start in range(0, len(points), chunk):
        out[start:start + chunk] = 1.0 - (points[start:start + chunk] @ centres.T).amax(dim=1)
    return out


def kcenter(feats: torch.Tensor, labelled: torch.Tensor | None, n: int, first: int) -> Ranking:
    """k-center greedy over the unit rows of ``feats``: each pick is the row farthest from the
    ``labelled`` rows and the earlier picks; without labelled rows the first pick is ``first``."""
    dist = nearest_distance(feats, labelled) if labelled is not None and len(labelled) else None
    order: list[int] = []
    distance: list[float | None] = []
    for _ in range(min(n, len(feats))):
        i = first if dist is None else int(dist.argmax())
        order.append(i)
        distance.append(None if dist is None else float(dist[i]))
        new = 1.0 - feats @ feats[i]
        dist = new if dist is None else torch.minimum(dist, new)
        dist[i] = -1.0  # never again
    return Ranking(order, distance)


def badge(scale: torch.Tensor, feats: torch.Tensor, n: int, seed: int) -> Ranking:
    """k-means++ seeding on the gradient embeddings ``scale[i] (x) feats[i]`` (BADGE): the first pick
    the longest, each next one drawn with probability proportional to its squared distance from the
    nearest earlier pick (seeded); each pick's distance is that one (None for the first). The
    ``[P, C x D]`` embeddings are never built: their inner product is ``(a_i . a_j)(f_i . f_j)``."""
    a, f = scale.double(), feats.double()
    norms = torch.linalg.vector_norm(a, dim=1).square() * torch.linalg.vector_norm(f, dim=1).square()

    def squared_distance(i: int) -> torch.Tensor:
        d2 = norms + norms[i] - 2 * (a @ a[i]) * (f @ f[i])
        # a copy of pick i is at 0, not at the rounding error of the expansion
        return torch.where(d2 <= 1e-9 * (norms + norms[i]), 0.0, d2)

    n = min(n, len(f))
    if n <= 0:
        return Ranking([], [])
    g = torch.Generator().manual_seed(seed)
    order: list[int] = [int(norms.argmax())]
    distance: list[float | None] = [None]
    d2 = squared_distance(order[0])
    while len(order) < n:
        d2[order] = 0.0  # never again
        if d2.sum() <= 0:  # the rest repeat earlier picks: take them by length
            rest = sorted(set(range(len(f))) - set(order), key=lambda i: (-float(norms[i]), i))[:n - len(order)]
            order += rest
            distance += [0.0] * len(rest)
            break
        order.append(int(torch.multinomial(d2, 1, generator=g)))
        distance.append(float(d2[order[-1]].sqrt()))
        d2 = torch.minimum(d2, squared_distance(order[-1]))
    return Ranking(order, distance)


def rank(method: str, uncertainty: torch.Tensor, feats: torch.Tensor, labelled: torch.Tensor | None, n: int,
         candidates: float, seed: int, scale: torch.Tensor | None = None) -> Ranking:
    """Pick ``n`` of the pool's images by ``method`` (:data:`SUGGEST_METHODS`).

    Args:
        uncertainty: each image's :meth:`~visiontune.task.Task.uncertainty` ``[P]``.
        feats: each image's classifier input features ``[P, D]``.
        labelled: features of labelled images ``[L, D]`` (k-center keeps away from them), or None.
        candidates: ``margin-kcenter`` short-lists the ``candidates x n`` least sure images.
        scale: ``badge``: each image's :meth:`~visiontune.task.Task.gradient_if_decided` ``[P, C]``.
    """
    SUGGEST_METHODS.check(method)
    n = min(n, len(uncertainty))
    by_doubt = sorted(range(len(uncertainty)), key=lambda i: (-float(uncertainty[i]), i))  # ties: pool order
    if method == "random":
        return Ranking(random.Random(seed).sample(range(len(uncertainty)), n), [None] * n)
    if method == "margin":
        return Ranking(by_doubt[:n], [None] * n)
    if method == "badge":
        if scale is None:
            raise ConfigError("--method badge needs the model's gradients (scale): rank through suggest()")
        return badge(scale, feats, n, seed)
    unit = _normalise(feats)
    seen = _normalise(labelled) if labelled is not None and len(labelled) else None
    if method == "kcenter":
        return kcenter(unit, seen, n, first=by_doubt[0])
    short = by_doubt[:max(n, int(round(candidates * n)))]
    if method == "margin-cluster":
        return Ranking([short[i] for i in cluster_picks(unit[short], n, seed)], [None] * n)
    picked = kcenter(unit[short], seen, n, first=0)  # the short-list is in doubt order: 0 is the least sure
    return Ranking([short[i] for i in picked.order], picked.distance)


def cluster_picks(unit: torch.Tensor, n: int, seed: int, iterations: int = 10) -> list[int]:
    """``n`` rows of ``unit`` (in doubt order, least sure first): k-means into ``n`` clusters
    (cosine, k-means++ start, seeded), then the least sure row of each cluster, the clusters taken
    by their least sure row; rows of no cluster fill up in doubt order."""
    g = torch.Generator().manual_seed(seed)
    centres = unit[torch.randint(len(unit), (1,), generator=g)]
    while len(centres) < n:  # k-means++: the next centre far from the chosen ones
        weights = (1.0 - unit @ centres.T).amin(dim=1).clamp_min(0) ** 2  # squared distance to the nearest
        if weights.sum() <= 0:  # every row is a chosen centre already (duplicates): the clusters are done
            break
        centres = torch.cat([centres, unit[torch.multinomial(weights, 1, generator=g)]])
    for _ in range(iterations):
        assign = (unit @ centres.T).argmax(dim=1)
        for c in range(len(centres)):
            members = unit[assign == c]
            if len(members):
                centres[c] = torch.nn.functional.normalize(members.mean(0), dim=0)
    assign = (unit @ centres.T).argmax(dim=1).tolist()
    first_of: dict[int, int] = {}
    for i, c in enumerate(assign):  # rows in doubt order: the first row of a cluster is its least sure
        first_of.setdefault(c, i)
    picks = sorted(first_of.values())[:n]
    chosen = set(picks)
    rest = [i for i in range(len(unit)) if i not in chosen]
    return picks + rest[:n - len(picks)]


def labelled_paths(run: Path) -> tuple[set[str], list[str]]:
    """The resolved paths of every image in the run's ``splits/`` (left out of the pool), and its
    training images (whose features seed the k-center). Empty for a model folder without splits."""
    from ..core.layout import RunLayout
    from ..data.csvfile import read_csv_rows

    layout = RunLayout(run)
    seen: set[str] = set()
    train: list[str] = []
    for split in ("train", "val", "test"):
        path = layout.split_csv(split)
        if not path.is_file():
            continue
        try:  # the first cell of each row after the header (written by visiontune; read as plain text)
            paths = [row[0] for line, row in read_csv_rows(path, comments=False) if line > 1 and row]
        except (DataError, ValueError, OSError) as exc:
            raise DataError(f"{path} cannot be read ({exc}); train the run again, or point suggest at its "
                            "model/ folder (no splits: nothing is left out of the pool)") from exc
        seen.update(os.path.realpath(p) for p in paths)
        if split == "train":
            train = paths
    return seen, train


def suggest(run: str | os.PathLike, pool: str | os.PathLike, **options: Any) -> Suggestions:
    """Rank the images of ``pool`` to label next and write ``suggestions.csv`` and ``.html``: the
    ``suggest`` command.

    Args:
        run: a run dir or ``model/`` dir (features need the PyTorch model).
        pool: a folder of unlabelled images (recursive), a file or a glob pattern.
        **options: any :class:`SuggestOptions` by name, e.g. ``n=500``.

    Returns:
        :class:`Suggestions`.

    Example:
        >>> suggest("runs/train-1", "unlabelled/", n=2).rows[0]["why"]  # doctest: +SKIP
        'uncertain: cat 0.41 vs dog 0.38; far from the labelled images (distance 0.31)'
    """
    from ..inference.classifier import Classifier, expand_inputs

    opts = SuggestOptions.from_dict(options)
    run = Path(run)
    files = expand_inputs([str(pool)])
    if not files:
        raise ConfigError(f"no images found in {pool}: give a folder of unlabelled images, a file or a glob")
    seen, train = labelled_paths(run) if run.is_dir() else (set(), [])
    fresh = [f for f in files if os.path.realpath(f) not in seen]
    if not fresh:
        raise ConfigError(f"every image in {pool} is already in the run's training data (its splits/): point "
                          "suggest at images the model was not trained on")
    out = Path(opts.out) if opts.out else run / "suggestions"
    refuse_link(out)
    clf = Classifier.load(run, precision="32")
    feats, logits, ok = clf.features_of(fresh, opts.batch_size, opts.workers)
    readable = [i for i in range(len(fresh)) if ok[i]]
    if not readable:
        raise DataError(f"none of the {len(fresh)} image(s) in {pool} could be read")
    probs = clf.task.probabilities(logits[readable], clf.temperature)
    doubt = clf.task.uncertainty(probs, clf.thresholds)
    labelled = None
    if opts.method in ("margin-kcenter", "kcenter") and train:
        sample = random.Random(opts.seed).sample(train, min(MAX_LABELLED, len(train)))
        lab_feats, _, lab_ok = clf.features_of(sample, opts.batch_size, opts.workers)
        labelled = lab_feats[lab_ok]
    scale = clf.task.gradient_if_decided(probs, clf.thresholds) if opts.method == "badge" else None
    picked = rank(opts.method, doubt, feats[readable], labelled, opts.n, opts.candidates, opts.seed, scale)
    rows = []
    top = probs.max(dim=1)
    for place, (i, dist) in enumerate(zip(picked.order, picked.distance), start=1):
        why = f"uncertain: {clf.task.uncertainty_reason(probs[i], clf.class_names, clf.thresholds)}"
        if opts.method == "badge":
            why += ("; the longest gradient: labelled, it would move the model most" if dist is None else
                    f"; its gradient far from the earlier picks' (distance {dist:.3g})")
        elif dist is not None:
            why += f"; far from the labelled images and earlier picks (distance {dist:.2f})"
        rows.append({"rank": place, "path": fresh[readable[i]], "uncertainty": round(float(doubt[i]), 4),
                     "predicted": clf.class_names[int(top.indices[i])], "probability": round(float(top.values[i]), 4),
                     "distance": None if dist is None else round(dist, 4), "why": why})
    out.mkdir(parents=True, exist_ok=True)
    csv_path = atomic_write_text(out / "suggestions.csv", suggestions_csv(rows, opts.csv_safe))
    html_path = atomic_write_text(out / "suggestions.html", suggestions_html(rows, opts.method, len(readable)))
    return Suggestions(rows, csv_path, html_path, len(files), len(files) - len(fresh), len(fresh) - len(readable))


def suggestions_csv(rows: list[dict[str, Any]], csv_safe: bool = False) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        cells = ["" if row[c] is None else str(row[c]) for c in CSV_COLUMNS]
        writer.writerow([spreadsheet_safe(c) for c in cells] if csv_safe else cells)
    return buf.getvalue()


def suggestions_html(rows: list[dict[str, Any]], method: str, scored: int) -> str:
    """One self-contained page: the picks in order, each with its thumbnail and why."""
    from ..evaluation.report_sections import CSS, gallery, thumb_uri

    items = []
    for row in rows:
        uri = thumb_uri(row["path"]) or ""
        items.append((uri, f"#{row['rank']} {Path(row['path']).name}: {row['why']}", False))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>visiontune suggest</title>"
            f"<style>{CSS}</style></head><body><header><h1>Images to label next</h1>"
            f"<p>{len(rows)} of {scored} scored images, method {html.escape(method)}</p></header><main>"
            f"<section>{gallery(items)}</section></main></body></html>\n")
