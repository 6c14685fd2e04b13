"""Fit the unknown-score at the end of training: measure every candidate, keep the best, set its threshold.

The candidates (:data:`~visiontune.models.unknown.UNKNOWN_SCORES`; the feature scores on each
source of features: the classifier's input and, where the network lists one, its last feature
stage, :func:`~visiontune.models.unknown.feature_layer`) are measured by a cross-validation over
*classes*: a fold holds some classes out, fits each score's statistics on
the training images of the others (a logit score keeps only their logits), and asks how well it
tells the validation images of kept classes (known) from those of held-out classes (unknown):
the AUROC. Held-out classes are the nearest unknowns a user is likely to meet; the score with the
best mean AUROC is fitted on every class, and its threshold is the score that accepts ``tpr``
(95%) of the validation images.

One bias is stated, not removed: the network was trained on all classes, so its features know
the classes a fold holds out; the estimate is optimistic for every candidate, and the held-out
classes of ``bench/openset.py`` measure the real figure. The sum of the two feature scores is
standardised on the fold's known val images, the known side of its own AUROC: one ratio fitted on
the images it is measured on (a slight advantage, on top of :data:`FUSED_MARGIN`).

A multi-label model's images may carry no label at all, so an image is unknown by being unlike
the training images, not by lacking a class: its candidates are the feature scores of a single
Gaussian of all training features (``mahalanobis``), ``knn`` and their sum (not ``mahalanobis-normed``,
which needs classes: :func:`candidates`). With no classes to hold out
there is nothing to select on, so ``knn`` (the better of the two on far unknowns in OpenOOD v1.5)
is fitted without a selection.

Example:
    fitted = fit_unknown(clf, train_samples, val_samples)
    fitted.section["score"], fitted.section["threshold"]
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.errors import DataError
from ..data.scan import Sample
from ..inference.classifier import Classifier
from ..models.artifact import read_card, write_card
from ..models.unknown import (
    DEFAULT_TPR,
    FEATURE_SCORES,
    FUSED,
    MAX_BANK,
    NORMED,
    UNKNOWN_SCORES,
    UnknownScore,
    card_section,
    feature_layer,
    min_spread,
    normed,
    save_score,
)

FOLDS = 5                 # class splits of the selection
HELD_OUT_SHARE = 0.4      # classes a fold holds out (at least 1; at least 2 stay known where there are 3+)
MAX_STATS_IMAGES = MAX_BANK  # training images the statistics are fitted on (per class as even as the data allows)
MAX_VAL_IMAGES = 5000     # validation images the selection and the threshold use
QUANTILES = 101           # percentiles of the val scores kept in the card
SHRINKAGE = 1e-3          # share of the mean variance added to the covariance's diagonal (a singular one inverts)
# A feature score on the last stage is kept over the same score on the classifier's input unless
# that one leads the estimate by more than this. Why: the estimate is optimistic, and most for the
# classifier's input, which training fitted to separate every class, the held-out ones included. On
# bench/openset.py (CIFAR-10, 4 classes never trained on) the two Mahalanobis scores tied in the
# estimate (0.951 / 0.950) while the last stage's was far ahead on the real unknowns: near AUROC
# 0.829 against 0.752, far 0.994 against 0.975.
STAGE_MARGIN = 0.01
# The sum of the two feature scores is kept over either alone unless that one leads it by more than
# this in the estimate. On bench/openset.py --splits the estimate saturates near 0.99 where the real
# unknowns tell the scores apart: split 0 read Mahalanobis@blocks.6 0.9911, the sum 0.9908, and the
# held-out classes gave near AUROC 0.897 and 0.924 (kNN 0.919); split 2 read the sum first (0.957).
# With the margin the sum was chosen in splits 0, 2, 3 and 4: near AUROC 0.895 -> 0.920 on average
# (split 3: 0.903 -> 0.896), far 0.990 -> 0.988 (bench/RESULTS.md, "the literature's splits")
FUSED_MARGIN = 0.01
FUSED_PARTS = ("mahalanobis", "knn")  # the sum is preferred over these alone, not over other scores
# Mahalanobis on moved and scaled features is kept over any other feature score on the last stage
# unless that one leads the estimate by more than this. Why so wide: the estimate cannot see what it gains.
# On the five networks of bench/openset.py (--splits 0, 2, 3, 4 and its own split) the held-out
# classes' estimate put it 0.008-0.047 below the leader, while the classes never trained on put it
# above every other candidate (near AUROC +0.1 to +5.1 points over the sum chosen before): the
# network knows the classes a fold holds out, so the estimate cannot say how a new class's features
# fall. The margin is wider than every gap seen, so the estimate overrules it only when far behind
NORMED_MARGIN = 0.05
RAW_FEATURE_SCORES = tuple(k for k in FEATURE_SCORES if k != NORMED)  # of one Gaussian; what NORMED is kept over


@dataclass
class FittedUnknown:
    """A fitted score, its card section and the seconds it took."""

    score: UnknownScore
    section: dict[str, Any]
    seconds: float


def candidates(multi_label: bool) -> tuple[str, ...]:
    """The scores a model may have: a multi-label model's feature scores of one Gaussian (the moved and
    scaled Mahalanobis needs classes: moved by the one Gaussian's own mean, it keeps no distance)."""
    return RAW_FEATURE_SCORES if multi_label else UNKNOWN_SCORES.names()


def fit_score(kind: str, features: torch.Tensor, targets: torch.Tensor | None, logits_width: int,
              temperature: float = 1.0, seed: int = 0, layer: str | None = None,
              reference: torch.Tensor | None = None) -> UnknownScore:
    """``kind`` fitted on training ``features [N, D]`` (of ``layer``; None: the classifier's input)
    with class ``targets [N]`` (None: one Gaussian of all of them, for multi-label models).

    ``reference``: features of known images the statistics are not fitted on (the val split's),
    which :data:`~visiontune.models.unknown.FUSED` standardises its two parts on (required there)."""
    if kind == FUSED:
        if reference is None:
            raise DataError(f"the {FUSED} score standardises its parts on known images it was not fitted on: "
                            "give them (the val split's)")
        return fused(*(fit_score(k, features, targets, logits_width, temperature, seed, layer)
                       for k in FUSED_PARTS), reference)
    features = features.double()
    dim = features.shape[1]
    if kind == NORMED:  # the Gaussians of the moved and scaled features; the move is the score's own
        if targets is None:
            raise DataError(f"the {NORMED} score needs class targets (moved by one Gaussian's own mean, every image "
                            "lies on the unit sphere around it and no distance is left): use mahalanobis or knn")
        origin = features.mean(0)
        plain = fit_score("mahalanobis", normed(features, origin), targets, logits_width, temperature, seed, layer)
        score = UnknownScore(kind, logits_width, dim, temperature, centres=plain.means.shape[0], layer=layer)
        score.means.copy_(plain.means)
        score.whitening.copy_(plain.whitening)
        score.origin.copy_(origin.float())
        return score
    if kind == "mahalanobis":
        groups = sorted(set(targets.tolist())) if targets is not None else [None]
        means = torch.stack([features[targets == g].mean(0) if g is not None else features.mean(0) for g in groups])
        centred = features - (means[[groups.index(int(t)) for t in targets]] if targets is not None else means[0])
        from sklearn.covariance import ledoit_wolf  # shrinkage set from the data: few images, many features

        cov = torch.from_numpy(ledoit_wolf(centred.numpy(), assume_centered=True)[0])
        cov += SHRINKAGE * cov.diagonal().mean() * torch.eye(dim, dtype=cov.dtype)
        evals, evecs = torch.linalg.eigh(cov)
        score = UnknownScore(kind, logits_width, dim, temperature, centres=len(groups), layer=layer)
        score.means.copy_(means.float())
        score.whitening.copy_((evecs / evals.clamp(min=1e-12).sqrt()).float())  # W W^T = cov^-1
        return score
    if kind == "knn":
        rows = features if len(features) <= MAX_BANK else features[torch.randperm(
            len(features), generator=torch.Generator().manual_seed(seed))[:MAX_BANK]]
        score = UnknownScore(kind, logits_width, dim, temperature, bank=len(rows), layer=layer)
        score.bank.copy_(torch.nn.functional.normalize(rows, dim=-1).float())
        return score
    return UnknownScore(kind, logits_width, dim, temperature)


def standardiser(known: np.ndarray | torch.Tensor) -> tuple[float, float]:
    """The mean a part of the :data:`~visiontune.models.unknown.FUSED` score is moved by and the
    spread it is divided by: its scores' on known images, the spread at least
    :func:`~visiontune.models.unknown.min_spread` of their mean (near-duplicate images give kNN
    similarities a spread of 1e-5, which would scale the runtimes' float32 rounding into the decision)."""
    known = torch.as_tensor(np.asarray(known, dtype=np.float64))
    mean = float(known.mean())
    return mean, max(float(known.std()), min_spread(mean))


def fused(mahalanobis: UnknownScore, knn: UnknownScore, reference: torch.Tensor) -> UnknownScore:
    """The :data:`~visiontune.models.unknown.FUSED` score of two fitted parts on the same features,
    each part standardised by :func:`standardiser` on ``reference`` (2+ known images' features)."""
    if len(reference) < 2:
        raise DataError(f"the {FUSED} score standardises its parts on at least 2 known images it was not fitted "
                        "on (the val split's)")
    score = UnknownScore(FUSED, 1, knn.bank.shape[1], mahalanobis.temperature, bank=knn.bank.shape[0],
                         centres=mahalanobis.means.shape[0], layer=knn.layer)
    score.means.copy_(mahalanobis.means)
    score.whitening.copy_(mahalanobis.whitening)
    score.bank.copy_(knn.bank)
    with torch.no_grad():
        known = [part(reference.float(), reference.float()).double() for part in (mahalanobis, knn)]  # no logits
    score.scale.copy_(torch.tensor([*standardiser(known[0]), *standardiser(known[1])]))
    return score


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """The chance that a known image scores above an unknown one (ties count half)."""
    from sklearn.metrics import roc_auc_score

    if len(known) == 0 or len(unknown) == 0:
        raise DataError("the AUROC needs both known and unknown images")
    y = np.r_[np.ones(len(known)), np.zeros(len(unknown))]
    return float(roc_auc_score(y, np.r_[known, unknown]))


def threshold_at(known: np.ndarray, tpr: float) -> float:
    """The score that accepts (score >= it) the share ``tpr`` of ``known`` scores (rounded up to
    whole images), half-way between the last accepted and the first rejected score, so that no
    image sits on it where runtimes' last bits would decide."""
    ranked = np.sort(np.asarray(known, np.float64))[::-1]
    accepted = min(len(ranked), max(1, int(np.ceil(tpr * len(ranked) - 1e-9))))
    last = ranked[accepted - 1]
    if accepted == len(ranked):
        return float(last - max(abs(last) * 1e-3, 1e-6))
    return float((last + ranked[accepted]) / 2)


def fpr_at_tpr(known: np.ndarray, unknown: np.ndarray, tpr: float = DEFAULT_TPR) -> float:
    """The share of unknown images accepted at the threshold that accepts ``tpr`` of the known ones."""
    return float((np.asarray(unknown) >= threshold_at(known, tpr)).mean())


def class_folds(num_classes: int, seed: int = 0) -> list[list[int]]:
    """The held-out classes of each fold: every class alone for 2 classes (so only the feature
    scores can be measured: one kept class has no logits to compare), else :data:`FOLDS` random
    draws of :data:`HELD_OUT_SHARE` of them (at least 2 kept)."""
    if num_classes < 2:
        return []
    if num_classes == 2:
        return [[0], [1]]
    held = min(num_classes - 2, max(1, round(HELD_OUT_SHARE * num_classes)))
    rng = np.random.default_rng(seed)
    return [sorted(rng.choice(num_classes, held, replace=False).tolist()) for _ in range(FOLDS)]


Features = torch.Tensor | dict[str | None, torch.Tensor]  # the classifier's input, or {layer: features}


def sources(features: Features) -> dict[str | None, torch.Tensor]:
    """``{layer: features}``; a bare tensor is the classifier's input (layer None)."""
    return features if isinstance(features, dict) else {None: features}


def select(train: tuple[Features, torch.Tensor, torch.Tensor], val: tuple[Features, torch.Tensor, torch.Tensor],
           temperature: float, seed: int = 0) -> list[dict[str, Any]]:
    """Each single-label candidate's mean and spread of the AUROC over :func:`class_folds`, best first
    after :func:`prefer`'s tie-breaks.

    ``train`` and ``val`` are (features, logits, targets); features are the classifier's input or
    ``{layer: features}`` with the classifier's input under None. The logit scores are measured
    once, the feature scores on each source (the rows' ``layer``). In a fold, the logit scores read the
    logits of a linear head fitted on the kept classes' training features alone (:func:`refit_head`):
    the network's own logits, its held-out columns dropped, still put the held-out images' weight
    in those columns and made every logit score look near perfect (CIFAR-10, 4 of 10 classes held
    out of training: 0.986 in this estimate, 0.730 on the held-out classes themselves).
    """
    train_f, val_f = sources(train[0]), sources(val[0])
    num_classes = train[1].shape[1]
    folds = class_folds(num_classes, seed)
    pairs = [(kind, layer) for kind in candidates(False) for layer in train_f
             if layer is None or kind in FEATURE_SCORES]
    results: dict[tuple[str, str | None], list[float]] = {pair: [] for pair in pairs}
    for held in folds:
        kept = [c for c in range(num_classes) if c not in held]
        keep_train = torch.isin(train[2], torch.tensor(kept))
        known_val = torch.isin(val[2], torch.tensor(kept))
        if len(set(train[2][keep_train].tolist())) < len(kept) or not known_val.any() or known_val.all():
            continue
        remap = torch.full((num_classes,), -1, dtype=torch.long)
        remap[kept] = torch.arange(len(kept))
        targets = remap[train[2][keep_train]]
        # one kept class (a 2-class model's folds) has no head to refit: only the feature scores are measured
        logits = refit_head(train_f[None][keep_train], targets, val_f[None], seed) if len(kept) > 1 else None
        scored: dict[tuple[str, str | None], np.ndarray] = {}
        known = known_val.numpy()
        for kind, layer in sorted(results, key=lambda pair: pair[0] == FUSED):  # the sum after its parts
            if logits is None and kind not in FEATURE_SCORES:
                continue
            if kind == FUSED:  # the parts' val scores of this fold, standardised on its known images
                parts = [scored.get((part, layer)) for part in FUSED_PARTS]
                if any(p is None for p in parts) or known.sum() < 2:
                    continue
                s = 0.0
                for part in parts:
                    mean, spread = standardiser(part[known])
                    s = s + (part - mean) / spread
            else:
                score = fit_score(kind, train_f[layer][keep_train], targets, len(kept), temperature, seed, layer)
                with torch.no_grad():
                    s = score(val_f[layer], logits if logits is not None else val[1][:, kept]).numpy().astype(
                        np.float64)
                scored[(kind, layer)] = s
            results[(kind, layer)].append(auroc(s[known], s[~known]))
    table = [{"score": kind, "layer": layer, "auroc": round(float(np.mean(v)), 4), "std": round(float(np.std(v)), 4),
              "folds": len(v)} for (kind, layer), v in results.items() if v]
    return prefer(sorted(table, key=lambda row: -row["auroc"]))


def prefer(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``table`` (best first) after the selection's tie-breaks: the last stage over the
    classifier's input (:func:`prefer_stage`), then the sum over either of its parts on one source
    (:func:`prefer_fused`), then the last stage again (the sum on the classifier's input may have
    come first where the sum on the last stage trails it by the margin), then Mahalanobis on moved
    and scaled features over the other feature scores of that source where it is the last stage
    (within :data:`NORMED_MARGIN`: the margin's evidence is the last stage's; on the classifier's
    input the estimate decides). The row chosen trails the best by at most
    ``2 * STAGE_MARGIN + FUSED_MARGIN + NORMED_MARGIN``.

    Example:
        >>> rows = [{"score": "knn", "layer": None, "auroc": 0.970},
        ...         {"score": "mahalanobis+knn", "layer": None, "auroc": 0.965},
        ...         {"score": "mahalanobis+knn", "layer": "blocks.6", "auroc": 0.962},
        ...         {"score": "knn", "layer": "blocks.6", "auroc": 0.950}]
        >>> [prefer(rows)[0][k] for k in ("score", "layer")]
        ['mahalanobis+knn', 'blocks.6']
        >>> prefer(rows + [{"score": "mahalanobis-normed", "layer": "blocks.6", "auroc": 0.930}])[0]["score"]
        'mahalanobis-normed'
    """
    ordered = prefer_stage(prefer_fused(prefer_stage(table)))
    if not ordered or ordered[0]["layer"] is None:
        return ordered
    return move_first(ordered, NORMED, RAW_FEATURE_SCORES, NORMED_MARGIN)


def prefer_stage(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``table`` (best first) with the last stage's row of the leading feature score moved to the
    front when it trails that score on the classifier's input by at most :data:`STAGE_MARGIN`.

    Example:
        >>> rows = [{"score": "mahalanobis", "layer": None, "auroc": 0.951},
        ...         {"score": "mahalanobis", "layer": "blocks.6", "auroc": 0.950}]
        >>> prefer_stage(rows)[0]["layer"]
        'blocks.6'
    """
    if not table or table[0]["layer"] is not None or table[0]["score"] not in FEATURE_SCORES:
        return table
    stage = next((row for row in table if row["score"] == table[0]["score"] and row["layer"] is not None), None)
    if stage is None or table[0]["auroc"] - stage["auroc"] > STAGE_MARGIN:
        return table
    return [stage] + [row for row in table if row is not stage]


def prefer_fused(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``table`` (best first) with the :data:`~visiontune.models.unknown.FUSED` row of the leading
    feature score's source moved to the front when it trails that score by at most :data:`FUSED_MARGIN`.

    Example:
        >>> rows = [{"score": "mahalanobis", "layer": "blocks.6", "auroc": 0.9911},
        ...         {"score": "mahalanobis+knn", "layer": "blocks.6", "auroc": 0.9908}]
        >>> prefer_fused(rows)[0]["score"]
        'mahalanobis+knn'
    """
    return move_first(table, FUSED, FUSED_PARTS, FUSED_MARGIN)


def move_first(table: list[dict[str, Any]], kind: str, over: tuple[str, ...], margin: float) -> list[dict[str, Any]]:
    """``table`` (best first) with ``kind``'s row on the leading row's source moved to the front when
    the leader is one of ``over`` and leads it by at most ``margin``; else ``table`` as it was."""
    if not table or table[0]["score"] not in over:
        return table
    row = next((r for r in table if r["score"] == kind and r["layer"] == table[0]["layer"]), None)
    if row is None or table[0]["auroc"] - row["auroc"] > margin:
        return table
    return [row] + [r for r in table if r is not row]


def refit_head(features: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Logits of ``inputs`` from a logistic regression on standardised ``features`` of ``targets`` (two
    classes give the two columns of a binary model's one decision)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from .probe_selection import one_thread

    scaler = StandardScaler().fit(features.numpy())
    with one_thread():
        clf = LogisticRegression(C=0.1, max_iter=300, random_state=seed).fit(scaler.transform(features.numpy()),
                                                                           targets.numpy())
    z = clf.decision_function(scaler.transform(inputs.numpy()))
    z = np.stack([-z / 2, z / 2], 1) if z.ndim == 1 else z
    return torch.from_numpy(z).float()


def stats_subset(targets: torch.Tensor | None, n: int, limit: int, seed: int = 0) -> torch.Tensor:
    """Indices of at most ``limit`` of ``n`` training images, as even per class as the data allows."""
    if n <= limit:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    if targets is None or targets.dim() != 1:
        return torch.randperm(n, generator=g)[:limit].sort().values
    classes = targets.unique()
    per_class = limit // len(classes)
    picked = [torch.nonzero(targets == c).flatten() for c in classes]
    picked = [idx[torch.randperm(len(idx), generator=g)[:per_class]] for idx in picked]
    return torch.cat(picked).sort().values


def sources_of(clf: Classifier) -> tuple[str | None, ...]:
    """The sources of features a selection measures: the classifier's input (the logit scores and the
    refitted heads need it) and, for a single-label network that lists one, its last feature stage."""
    second = (None if clf.task.name == "multi" or clf.model is None
              else feature_layer(clf.model, clf.card.architecture.classifier, clf.preprocessing.input_size))
    return (None,) + ((second,) if second is not None else ())


Taps = tuple[dict[str | None, torch.Tensor], torch.Tensor, torch.Tensor]  # features by source, logits, readable


def fit_unknown(clf: Classifier, train: list[Sample], val: list[Sample], tpr: float = DEFAULT_TPR,
                batch_size: int = 64, workers: int | None = None, seed: int = 0, kind: str | None = None,
                layer: str | None = None, val_taps: Taps | None = None) -> FittedUnknown:
    """Measure the candidate scores of ``clf`` on its training and validation images, fit the best
    (or ``kind`` on ``layer``'s features, None: the classifier's input) and its threshold at
    ``tpr``; nothing is written (see :func:`store_unknown`).

    ``val_taps``: what :meth:`~visiontune.inference.classifier.Classifier.taps_of` gives for ``val``
    under ``clf``'s views, for every one of :func:`sources_of` (the finish of a run reads the val
    images once for its metrics, its test-time augmentation and this fit); used where ``val`` is
    within :data:`MAX_VAL_IMAGES`."""
    started = time.perf_counter()
    if not val:
        raise DataError("the unknown-score's threshold needs validation images; give the run a val split")
    multi = clf.task.name == "multi"
    train_targets = clf.task.targets([y for _, y in train], clf.card.num_classes)
    chosen = stats_subset(train_targets, len(train), MAX_STATS_IMAGES, seed)
    train = [train[i] for i in chosen.tolist()]
    forced = kind is not None
    layers = ((None,) + ((layer,) if layer is not None else ())) if forced else sources_of(clf)
    if val_taps is not None and (len(val) > MAX_VAL_IMAGES or not set(layers) <= set(val_taps[0])):
        val_taps = None  # taps of more images than it fits on, or of other sources: read its share again
    if len(val) > MAX_VAL_IMAGES:
        val = [val[i] for i in stats_subset(None, len(val), MAX_VAL_IMAGES, seed).tolist()]
    tr_f, tr_z, tr_ok = clf.taps_of([p for p, _ in train], layers, batch_size, workers)
    va_f, va_z, va_ok = val_taps if val_taps is not None else clf.taps_of([p for p, _ in val], layers, batch_size,
                                                                            workers)
    tr_y = clf.task.targets([y for _, y in train], clf.card.num_classes)[tr_ok]
    va_y = clf.task.targets([y for _, y in val], clf.card.num_classes)[va_ok]
    tr_f, va_f = {k: v[tr_ok] for k, v in tr_f.items()}, {k: v[va_ok] for k, v in va_f.items()}
    tr_z, va_z = tr_z[tr_ok], va_z[va_ok]
    if len(va_z) == 0 or len(tr_z) == 0:
        raise DataError("no readable training or validation images to fit the unknown-score on")
    table = [] if multi or forced else select((tr_f, tr_z, tr_y), (va_f, va_z, va_y), clf.temperature, seed)
    if not forced:
        kind, layer = (table[0]["score"], table[0]["layer"]) if table else ("knn", None)
    score = fit_score(kind, tr_f[layer], None if multi else tr_y, clf.card.num_classes, clf.temperature, seed, layer,
                      reference=va_f[layer])
    with torch.no_grad():
        known = score(va_f[layer], va_z).numpy()
    threshold = threshold_at(known, tpr)
    method = ("classes held out of the statistics (cross-validation over classes)" if table
              else f"none (asked for {name({'score': kind, 'layer': layer})})" if forced
              else "none (multi-label: knn)" if multi else "none (no fold had known and held-out val images): knn")
    measured = {"selection": {"method": method, "candidates": table},
                "fitted_on": {"train_images": len(tr_z), "val_images": len(va_z)},
                "val_accepted": round(float((known >= threshold).mean()), 4),
                # the val scores' percentiles 0..100: a user moves the threshold to another TPR with them
                "val_quantiles": [float(q) for q in np.quantile(known.astype(np.float64),
                                                                np.linspace(0, 1, QUANTILES))]}
    return FittedUnknown(score.eval(), card_section(score, threshold, tpr, measured), time.perf_counter() - started)


def store_unknown(model_dir, fitted: FittedUnknown) -> None:
    """Write the score's statistics beside the weights, then its section into model.json."""
    save_score(model_dir, fitted.score)
    write_card(model_dir, read_card(model_dir).replace(unknown=fitted.section))


def describe(section: dict[str, Any]) -> str:
    """One line for the training log."""
    table = section.get("selection", {}).get("candidates") or []
    measured = ", ".join(f"{name(row)} {row['auroc']:.3f}" for row in table)
    return (f"unknown-score: {name(section)}, threshold {section['threshold']:.4g} accepts "
            f"{section['val_accepted']:.1%} of the val images (set at {section['tpr']:.0%})"
            + (f"; AUROC with classes held out: {measured}" if measured else ""))


def name(row: dict[str, Any]) -> str:
    """A score and its source of features, as the log and the report print them: ``mahalanobis``
    (the classifier's input) or ``mahalanobis@blocks.6``."""
    return row["score"] + (f"@{row['layer']}" if row.get("layer") else "")
