"""``visiontune data check DATA [--val DIR]``: find data problems before they cost a training run.

Checks: unreadable / truncated / non-image / zero-size files, images below a size threshold,
exact duplicates (content hash) within a split and across splits (leakage), near-duplicates
(64-bit dHash, Hamming distance), class imbalance, classes with too few images, and likely label
errors: out-of-fold probabilities of a logistic regression on cached backbone features, ranked
by confident learning (``cleanlab`` when installed, else the built-in equivalent below).

Errors (``--strict`` exits 1): unreadable files, cross-split leaks, identical files with
different labels, classes without a readable image. Everything else is a warning.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..core.errors import ImageDecodeError
from ..core.hardware import resolve_precision
from ..data.cache import file_digests
from ..data.image import is_image_path, try_load
from ..data.label_tables import LabelTable, choose_task
from ..data.labels import per_task
from ..data.scan import data_root, outside_root, read_source, scan_files
from ..inference.features import FeatureExtractor
from ..models.factory import build_model, fit_input_size
from .data_check_multilabel import find_multilabel_errors, multilabel_samples, multilabel_summary, read_multilabel


@dataclass(frozen=True)
class LabelSearch:
    """How likely label errors are searched: out-of-fold predictions (``folds`` folds, ``seed``) of
    a linear model on the pooled features of the backbone ``model`` at ``img_size``, computed
    ``batch_size`` images at a time with ``workers`` loaders through the feature cache ``cache_dir``."""

    model: str
    img_size: int | None
    cache_dir: str | None
    folds: int
    seed: int
    batch_size: int
    workers: int | None


@dataclass(frozen=True)
class TaskCheck:
    """What the data check does differently for one task's labels (one entry of :data:`TASK_CHECKS`).

    Attributes:
        read: ``(DATA, VAL, the label tables choose_task read)`` -> ``([(path, split, label)],
            class names, split names)``.
        classes_of: the classes one file's label names.
        summary: ``(the training images' labels, class names)`` -> the task's own report entries.
        label_errors: ``(readable paths, label by path, class names, split by path, search)`` ->
            ``(likely label errors, how they were searched)``.
        min_classes: the fewest classes its data may have (fewer is an error; multi-label data
            has no floor here: a CSV without any label passes, as it always has).
        format: ``(report, limit)`` -> the task's own lines of :func:`format_check`.
        accuracy_of: what the label check's out-of-fold accuracy counts, after the figure ("" for images).
    """

    read: Callable[[Path, Path | None, list[LabelTable]], tuple[list[tuple[str, str, Any]], list[str], list[str]]]
    classes_of: Callable[[Any], tuple[str, ...]]
    summary: Callable[[list[Any], list[str]], dict[str, Any]]
    label_errors: Callable[..., tuple[list[dict[str, Any]], dict[str, Any]]]
    min_classes: int
    format: Callable[[dict[str, Any], int], list[str]]
    accuracy_of: str


def check_data(data: str | os.PathLike, val: str | os.PathLike | None = None, min_size: int = 32,
               min_per_class: int = 10, near_threshold: int = 4, imbalance_warning: float = 5.0,
               label_check: bool = True, model: str = "efficientnet_lite0", img_size: int | None = None,
               cache_dir: str | None = None, folds: int = 5, seed: int = 0, batch_size: int = 32,
               workers: int | None = None, task: str = "auto", label_delim: str = " ") -> dict[str, Any]:
    """Check a dataset; return a JSON-serialisable dict (see the module docstring for the checks).

    A multi-label CSV (``task`` auto|single|multi, as ``train`` decides it) is checked the same
    way, plus label cardinality and co-occurrence, with multi-label confident learning.

    Example:
        report = check_data("data/hymenoptera/train")
        report["errors"], len(report["label_issues"])
        # -> ([], 3)
    """
    data_path, val_path = Path(data), Path(val) if val else None
    chosen, _, tables = choose_task(data_path, val_path, task, label_delim)
    check = task_check(chosen)
    files, names, split_names = check.read(data_path, val_path, tables)
    split_of = {p: s for p, s, _ in files}
    label_of = {p: c for p, _, c in files}
    every = [p for p, _, _ in files]
    bad = scan_files(every)
    unreadable = [{"path": p, "split": split_of[p], "label": label_of[p], "kind": error.kind, "reason": str(error)}
                  for p, error in sorted(bad.items())]
    readable = [p for p in every if p not in bad]

    sizes = _sizes(readable)
    small = [{"path": p, "width": w, "height": h} for p, (w, h) in sizes.items() if min(w, h) < min_size]
    digests = dict(zip(readable, file_digests(readable)))
    groups: dict[str, list[str]] = defaultdict(list)
    for p in readable:
        groups[digests[p]].append(p)
    duplicates, leaks = [], []
    for digest, paths in sorted(groups.items(), key=lambda kv: kv[1][0]):
        if len(paths) < 2:
            continue
        entry = {"digest": digest, "files": [{"path": p, "split": split_of[p], "label": label_of[p]} for p in paths],
                 "conflicting_labels": len({label_of[p] for p in paths}) > 1}
        (leaks if len({split_of[p] for p in paths}) > 1 else duplicates).append(entry)
    near = _near_duplicates(readable, digests, near_threshold)

    counts = {c: {s: sum(1 for p in readable if c in check.classes_of(label_of[p]) and split_of[p] == s)
                  for s in split_names} for c in names}
    train_counts = {c: counts[c]["train"] for c in names}
    present = [n for n in train_counts.values() if n > 0]
    imbalance = {"ratio": round(max(present) / min(present), 2) if present else None,
                 "smallest": sorted(train_counts.items(), key=lambda kv: kv[1])[:3],
                 "largest": sorted(train_counts.items(), key=lambda kv: -kv[1])[:3]}
    few = [{"class": c, "count": n} for c, n in sorted(train_counts.items(), key=lambda kv: kv[1]) if n < min_per_class]
    empty = [c for c in names if sum(counts[c].values()) == 0]

    report: dict[str, Any] = {
        "data": str(data), "val": str(val) if val else None, "classes": counts, "num_files": len(every),
        "num_readable": len(readable), "unreadable": unreadable, "ignored_files": _ignored(Path(data), val),
        "small_images": small, "min_size": min_size, "duplicates": duplicates, "leaks": leaks,
        "near_duplicates": near, "near_threshold": near_threshold, "imbalance": imbalance, "few_images": few,
        "min_per_class": min_per_class, "label_issues": [], "label_check": {"skipped": "disabled"},
    }
    report.update(check.summary([label_of[p] for p in readable if split_of[p] == "train"], names))
    if label_check:
        search = LabelSearch(model, img_size, cache_dir, folds, seed, batch_size, workers)
        report["label_issues"], report["label_check"] = check.label_errors(readable, label_of, names, split_of, search)

    report["outside_root"] = sorted(
        outside_root([p for p in every if split_of[p] != "val" or val is None], data_root(data))
        + (outside_root([p for p in every if split_of[p] == "val"], data_root(val)) if val else []))
    conflicting = sum(1 for g in duplicates + leaks if g["conflicting_labels"])
    errors = [text for found, text in (
        (unreadable, f"{len(unreadable)} unreadable file(s)"),
        (leaks, f"{len(leaks)} file(s) present in more than one split (train/val leakage)"),
        (conflicting, f"{conflicting} identical file group(s) with different labels"),
        (empty, f"class(es) without a readable image: {', '.join(empty)}"),
        (len(names) < check.min_classes,
         f"{len(names)} class(es): a classifier needs at least {check.min_classes}")) if found]
    warnings = [text for found, text in (
        (duplicates, f"{len(duplicates)} group(s) of identical files within a split"),
        (near, f"{len(near)} near-duplicate pair(s) (dHash distance <= {near_threshold})"),
        (small, f"{len(small)} image(s) smaller than {min_size} px"),
        (report["outside_root"], f"{len(report['outside_root'])} file(s) resolve outside the data folder (symlinks, or "
                                 "absolute or '..' paths in a CSV)")) if found]
    if imbalance["ratio"] and imbalance["ratio"] > imbalance_warning:
        warnings.append(f"class imbalance {imbalance['ratio']}:1 (smallest: "
                        + ", ".join(f"{c} {n}" for c, n in imbalance["smallest"]) + ")")
    if few:
        warnings.append(f"{len(few)} class(es) with fewer than {min_per_class} images: "
                        + ", ".join(f"{f['class']} ({f['count']})" for f in few[:10]))
    if report["label_issues"]:
        warnings.append(f"{len(report['label_issues'])} likely label error(s)")
    catch_all = catch_all_classes(names)
    if catch_all:
        warnings.append(catch_all)
    report.update({"errors": errors, "warnings": warnings, "ok": not errors})
    return report


# class names that usually mean "none of the others" (compared lower-case, without separators)
CATCH_ALL_NAMES = ("other", "others", "unknown", "background", "none", "noneofthese", "misc", "miscellaneous", "rest",
                   "negative", "negatives", "nothing", "garbage", "reject", "outofdistribution", "ood")


def catch_all_classes(names: list[str]) -> str:
    """A warning for classes named like a catch-all (``other``, ``unknown``, ``background``...), and
    the two ways to answer "none of these"; '' when there is none."""
    found = [n for n in names if "".join(c for c in n.lower() if c.isalnum()) in CATCH_ALL_NAMES]
    if not found:
        return ""
    return (f"class(es) {', '.join(repr(n) for n in found)} look like a catch-all for images of no other class. "
            "That works only for the kinds of images the folder shows: an unseen kind is still answered as one of "
            "the classes. Every model visiontune trains also has an unknown-score, fitted on the other classes, "
            "that answers 'unknown' for images unlike all of them (predict's unknown column; measure it with "
            "`visiontune evaluate MODEL DATA --unknown DIR`). Keep the folder if it holds a real, recurring kind "
            "of input (e.g. empty frames); else remove it and rely on the unknown-score")


def _read_single(data: Path, val: Path | None, tables: list[LabelTable]
                 ) -> tuple[list[tuple[str, str, str]], list[str], list[str]]:
    """([(path, split, class)], class names, split names) of single-label class folders or ``path,label`` CSVs."""
    raw = read_source(data, val)
    files = [(p, split, label) for split, classes in raw.items() for label, paths in classes.items() for p in paths]
    return files, sorted(raw["train"]), list(raw)


def _ignored(data: Path, val) -> list[str]:
    """Non-image, non-hidden files inside class folders (training never sees them)."""
    out = []
    for root in [data] + ([Path(val)] if val else []):
        if root.is_dir():
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                out += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".") and not is_image_path(f)
                        and Path(dirpath) != root]
    return sorted(out)


def _sizes(paths: list[str]) -> dict[str, tuple[int, int]]:
    def size(p):
        try:
            with Image.open(p) as img:
                return p, img.size
        except OSError:
            return p, None

    with ThreadPoolExecutor(max_workers=8) as pool:
        return {p: s for p, s in pool.map(size, paths) if s is not None}


def dhash(image: Image.Image, size: int = 8) -> int:
    """64-bit difference hash: sign of horizontal gradients of a 9x8 grayscale thumbnail."""
    small = np.asarray(image.convert("L").resize((size + 1, size), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int(np.packbits(bits).view(">u8")[0])


def _near_duplicates(paths: list[str], digests: dict[str, str], threshold: int) -> list[dict[str, Any]]:
    """Pairs of different files whose dHashes differ in <= ``threshold`` bits (exact copies excluded)."""
    def hash_one(p):
        image = try_load(p, draft_size=64)
        return None if image is None else dhash(image)

    with ThreadPoolExecutor(max_workers=8) as pool:
        hashes = list(pool.map(hash_one, paths))
    keep = [i for i, h in enumerate(hashes) if h is not None]
    if len(keep) < 2:
        return []
    values = np.array([hashes[i] for i in keep], dtype=np.uint64)
    pairs = []
    for start in range(0, len(values), 512):
        block = np.bitwise_count(values[start:start + 512, None] ^ values[None, :])
        for a, b in zip(*np.nonzero(block <= threshold)):
            i, j = start + int(a), int(b)
            pa, pb = paths[keep[i]], paths[keep[j]]
            if i < j and digests[pa] != digests[pb]:
                pairs.append({"a": pa, "b": pb, "distance": int(block[a, b])})
    return sorted(pairs, key=lambda d: (d["distance"], d["a"]))


def confident_learning_issues(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Indices of likely label errors ranked by self-confidence (lowest first), without cleanlab.

    Confident learning (Northcutt et al., 2021): class j's threshold t_j is the mean predicted
    probability of j over the samples labelled j; sample i is *confidently* of class j when
    p_ij >= t_j (the most probable such j when several). It is flagged when that class differs from
    its given label; flagged samples are ranked by p_i,given (self-confidence), least confident first.
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    k = probs.shape[1]
    thresholds = np.array([probs[labels == j, j].mean() if (labels == j).any() else 1.0 for j in range(k)])
    above = probs >= thresholds[None, :] - 1e-12
    masked = np.where(above, probs, -1.0)
    confident = masked.argmax(1)
    has = above.any(1)
    flagged = np.nonzero(has & (confident != labels))[0]
    self_conf = probs[np.arange(len(labels)), labels]
    return flagged[np.argsort(self_conf[flagged], kind="stable")]


def out_of_fold_probs(features: np.ndarray, labels: np.ndarray, folds: int = 5,
                      seed: int = 0) -> tuple[np.ndarray, int]:
    """Cross-validated predicted probabilities of a standardised logistic regression."""
    # lazy: scikit-learn loads only when the label check runs
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_splits = int(max(2, min(folds, np.bincount(labels)[np.bincount(labels) > 0].min())))
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000))
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return cross_val_predict(clf, features, labels, cv=cv, method="predict_proba"), n_splits


def find_label_errors(samples, names, split_of, search: LabelSearch) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(ranked label issues, method summary) from out-of-fold probabilities on backbone features
    (``samples``: (path, class index) pairs)."""
    counts = np.bincount([y for _, y in samples], minlength=len(names))
    usable = [(p, y) for p, y in samples if counts[y] >= 2]
    if len({y for _, y in usable}) < 2:
        return [], {"skipped": "needs at least 2 classes with >= 2 readable images"}
    features = backbone_features(usable, len(names), search)
    present = sorted({y for _, y in usable})  # re-index: classes with < 2 images take no part
    remap = {c: i for i, c in enumerate(present)}
    labels = np.array([remap[y] for _, y in usable])
    probs, n_splits = out_of_fold_probs(features, labels, search.folds, search.seed)
    try:
        from cleanlab.filter import find_label_issues  # lazy: as above

        ranked = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
        method = "cleanlab.find_label_issues (self_confidence)"
    except ImportError:
        ranked = confident_learning_issues(labels, probs)
        method = "built-in confident learning (self_confidence)"
    issues = []
    for i in ranked:
        i = int(i)
        guess = int(probs[i].argmax())
        issues.append({"path": usable[i][0], "split": split_of[usable[i][0]], "label": names[present[labels[i]]],
                       "suggested": names[present[guess]], "self_confidence": round(float(probs[i, labels[i]]), 4),
                       "suggested_probability": round(float(probs[i, guess]), 4)})
    summary = {"method": method, "model": search.model, "folds": n_splits, "num_images": len(usable),
               "out_of_fold_accuracy": round(float((probs.argmax(1) == labels).mean()), 4)}
    return issues, summary


def backbone_features(samples, num_classes: int, search: LabelSearch) -> np.ndarray:
    """Pooled backbone features (the classifier layer's input), through the feature cache."""
    torch.manual_seed(search.seed)  # the same head init as a training run with this seed: same cache key
    model, arch, pre = build_model(search.model, num_classes)
    if search.img_size:
        pre = pre.with_size(search.img_size)
        fit_input_size(model, pre.height, pre.width)
    extractor = FeatureExtractor(model, arch.classifier, arch.name, pre, resolve_precision("auto", pre.height),
                                 search.cache_dir, batch_size=search.batch_size * 2, workers=search.workers,
                                 seed=search.seed)
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout clean for --json
        feats, _, kept = extractor.features(samples)
    if len(kept) != len(samples):  # a file changed since the scan: no features, no verdict
        raise ImageDecodeError(f"{len(samples) - len(kept)} image(s) became unreadable during the check; run it again")
    return feats[:, 0].float().numpy()


def format_check(report: dict[str, Any], limit: int = 10) -> str:
    """Human-readable summary of :func:`check_data`'s result."""
    check = task_check(report.get("task", "single"))  # a single-label report names no task
    lines = [f"data check: {report['data']}" + (f" (val: {report['val']})" if report["val"] else ""),
             f"files: {report['num_files']}, readable: {report['num_readable']}"]
    width = max([len(c) for c in report["classes"]] + [5]) + 2
    splits = list(next(iter(report["classes"].values()), {}))
    lines.append(f"{'class':<{width}}" + "".join(f"{s:>8}" for s in splits))
    for c, per in report["classes"].items():
        lines.append(f"{c:<{width}}" + "".join(f"{per[s]:8d}" for s in splits))
    lines += _block("unreadable files", report["unreadable"], lambda x: f"{x['path']}: {x['reason']}", limit)
    lines += _block("cross-split leaks", report["leaks"],
                    lambda g: " == ".join(f"{f['split']}:{f['path']}" for f in g["files"]), limit)
    lines += _block("exact duplicates", report["duplicates"], lambda g: " == ".join(f["path"] for f in g["files"]),
                    limit)
    lines += _block("near-duplicates", report["near_duplicates"],
                    lambda x: f"{x['a']} ~ {x['b']} (distance {x['distance']})", limit)
    lines += _block("small images", report["small_images"], lambda x: f"{x['path']}: {x['width']}x{x['height']}",
                    limit)
    lines += _block("ignored non-image files", report["ignored_files"], str, limit)
    lines += check.format(report, limit)
    if "method" in report["label_check"]:
        lc = report["label_check"]
        lines.append(f"label check: {lc['method']} on {lc['model']} features, {lc['folds']}-fold out-of-fold "
                     f"accuracy {lc['out_of_fold_accuracy']:.3f}{check.accuracy_of}")
    for e in report["errors"]:
        lines.append(f"error: {e}")
    for w in report["warnings"]:
        lines.append(f"warning: {w}")
    lines.append("ok: no errors" if report["ok"] else f"{len(report['errors'])} error(s)")
    return "\n".join(lines)


def _block(title: str, items: list, fmt: Callable[[Any], str], limit: int) -> list[str]:
    """``title (count):`` and the first ``limit`` items, one a line (none: no lines)."""
    if not items:
        return []
    more = [f"  ... {len(items) - limit} more (--json lists all)"] if len(items) > limit else []
    return [f"{title} ({len(items)}):", *("  " + fmt(x) for x in items[:limit]), *more]


# ----------------------------------------------------------------------------- the parts of each task
def _single_label_issues(readable: list[str], label_of: dict[str, str], names: list[str], split_of: dict[str, str],
                         search: LabelSearch) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    return find_label_errors([(p, names.index(label_of[p])) for p in readable], names, split_of, search)


def _multi_label_issues(readable: list[str], label_of: dict[str, tuple[str, ...]], names: list[str],
                        split_of: dict[str, str], search: LabelSearch) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    samples = multilabel_samples(readable, label_of, names)
    features = backbone_features(samples, len(names), search)
    issues, summary = find_multilabel_errors(samples, names, split_of, features, search.folds, search.seed)
    return issues, {**summary, "model": search.model}


def _single_label_lines(report: dict[str, Any], limit: int) -> list[str]:
    return _block("likely label errors", report["label_issues"],
                  lambda x: f"{x['path']}: labelled {x['label']}, looks like {x['suggested']} "
                            f"(p={x['suggested_probability']:.2f}, self-confidence {x['self_confidence']:.2f})", limit)


def _multi_label_lines(report: dict[str, Any], limit: int) -> list[str]:
    per_image = report["labels_per_image"].items()
    return (["labels per image (train): " + ", ".join(f"{k}: {n}" for k, n in per_image)]
            + _block("most frequent label pairs", report["cooccurrence"],
                     lambda x: f"{' + '.join(x['labels'])}: {x['images']}", limit)
            + _block("likely label errors", report["label_issues"],
                     lambda x: f"{x['path']}: labelled [{' '.join(x['labels'])}], looks like "
                               f"[{' '.join(x['suggested'])}]", limit))


#: The data check's parts of every task, by task name (see :class:`TaskCheck`).
TASK_CHECKS: dict[str, TaskCheck] = {
    "single": TaskCheck(read=_read_single, classes_of=lambda label: (label,), summary=lambda label_sets, names: {},
                        label_errors=_single_label_issues, min_classes=2, format=_single_label_lines,
                        accuracy_of=""),
    "multi": TaskCheck(read=read_multilabel, classes_of=lambda labels: labels, summary=multilabel_summary,
                       label_errors=_multi_label_issues, min_classes=0, format=_multi_label_lines,
                       accuracy_of=" (label decisions)"),
}


def task_check(task: str) -> TaskCheck:
    """The data check's parts of ``task`` (a task's name or :class:`~visiontune.task.Task`).

    Raises:
        KeyError: a task without them; the message lists the known ones.
    """
    return per_task(TASK_CHECKS, task, "data check")
