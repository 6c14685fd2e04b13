"""The unknown-score: how much an image looks like the images a model was trained on.

A classifier answers one of its classes for any image, also for one of no class it knows (a cat
sent to an ants/bees model). Training fits one of :data:`UNKNOWN_SCORES` on its own images
(:mod:`visiontune.training.unknown` measures them all and keeps the best) and a threshold that
accepts a stated share of known images (95% by default); an image scoring below it is
``unknown``. The score is computed in the forward pass from the logits and one source of features:
the classifier's input, or the pooled output of the network's last feature stage
(:func:`feature_layer`, the card's ``layer``), so the PyTorch runner and the exported graphs give
the same number.

Higher always means "more like the training images". The statistics live in
``unknown.safetensors`` beside ``model.safetensors``; the card's ``unknown`` section names the
score, its threshold and what it was measured at. Both are validated before use: a file of the
wrong shape or an absurd size is refused, never trusted.

Example:
    >>> import torch
    >>> score = UnknownScore("max_logit", num_classes=2, dim=3)
    >>> score(torch.zeros(1, 3), torch.tensor([[2.0, -1.0]])).tolist()
    [2.0]
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.errors import ArtifactError, ConfigError
from ..core.registry import Registry
from ..core.safe_io import atomic_path
from .tta import mean_of_views, tta_mode, views

UNKNOWN_FILE = "unknown.safetensors"
# the k-th nearest training image's similarity: Sun et al. 2022 use k = 50 of 50,000 images; on this
# project's CIFAR-10 bench (bench/openset.py) k = 1 of 4,096 did best on near and far unknowns alike
# (AUROC 0.760 / 0.980 at k = 1, 0.756 / 0.977 at 3, 0.749 / 0.974 at 10)
KNN_K = 1
# Why a second source of features: on the same bench, Mahalanobis on EfficientNet-Lite0's last block
# (320 channels, before the 1x1 head convolution and its clipping ReLU6) gave near / far AUROC
# 0.830 / 0.994 where the classifier's 1280 inputs gave 0.750 / 0.978
LAYER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
MAX_BANK = 4096            # training images the kNN score keeps (its cost at inference: one matmul with them)
MAX_DIM = 8192             # widest classifier input a score's statistics may have
DEFAULT_TPR = 0.95         # share of known images the threshold accepts

# Why a sum of two: on the open-set literature's CIFAR-10 splits (bench/openset.py --splits), the two
# scores on the last stage err on different images: Mahalanobis near / far AUROC 0.897 / 0.991 and
# kNN 0.919 / 0.967 on split 0, their standardised sum 0.924 / 0.988. Over splits 0, 2, 3 and 4 the
# sum chosen at training took the near AUROC from 0.895 (Mahalanobis) to 0.920 on average
FUSED = "mahalanobis+knn"
# Why the features' direction: Mahalanobis on the last stage's features moved from their training
# mean and scaled to unit length (after Mueller & Hein 2025, "Mahalanobis++", who scale without
# moving), refitted on the networks of bench/openset.py --splits 0, 2, 3, 4, took their near AUROC
# from 0.923, 0.918, 0.896, 0.944 (the sum above) to 0.924, 0.946, 0.911, 0.954 (mean 0.920 -> 0.934;
# the bench's own split 0.829 -> 0.881) and far from 0.988 to 0.991 on average; scaled without
# moving (cached features): 0.928, 0.933, 0.881, 0.947
NORMED = "mahalanobis-normed"

def min_spread(mean: float) -> float:
    """The least spread a part of :data:`FUSED` is divided by: 1e-4 of its mean's size (at least 1e-4).

    Example:
        >>> min_spread(0.95), round(min_spread(-3000.0), 6)
        (0.0001, 0.3)
    """
    return 1e-4 * max(1.0, abs(mean))


UNKNOWN_SCORES = Registry.choices("unknown score", {
    "msp": "the largest calibrated class probability",
    "max_logit": "the largest logit (Vaze et al. 2022: a good closed-set classifier is all you need)",
    "energy": "log-sum-exp of the logits (Liu et al. 2020)",
    "mahalanobis": "minus the smallest Mahalanobis distance of the features to a class mean, shared covariance "
                   "(Lee et al. 2018)",
    NORMED: "mahalanobis on the features moved from their training mean and scaled to unit length (after "
            "Mueller & Hein 2025, Mahalanobis++)",
    "knn": f"cosine similarity of the normalised features to the {KNN_K}th nearest training image (Sun et al. 2022)",
    FUSED: "the sum of the mahalanobis and knn scores on the same features, each standardised by its mean and "
           "spread on known images the statistics were not fitted on (the val split)",
})
FEATURE_SCORES = ("mahalanobis", NORMED, "knn", FUSED)  # the scores that need statistics of the training features


class UnknownScore(nn.Module):
    """Score ``(features [N, D], logits [N, C]) -> [N]``; buffers hold the fitted statistics.

    Args:
        kind: one of :data:`UNKNOWN_SCORES`.
        num_classes: the classifier's outputs (``C``).
        dim: the classifier's input features (``D``).
        temperature: the calibration temperature (``msp``).
        bank: rows of the kNN bank; ``centres``: Gaussians of the Mahalanobis score (the classes,
            or 1 for a multi-label model, whose images have no single class). :data:`FUSED` holds
            both, and ``scale``: the mean and spread of each part on known images (4 numbers);
            :data:`NORMED` the Gaussians of the moved and scaled features and ``origin``, the
            training features' mean they are moved from.
        layer: the module whose pooled output are the ``features`` (None: the classifier's input).
    """

    def __init__(self, kind: str, num_classes: int, dim: int, temperature: float = 1.0, bank: int = 0,
                 centres: int = 0, layer: str | None = None):
        super().__init__()
        UNKNOWN_SCORES.check(kind)
        self.kind, self.k, self.layer = kind, KNN_K, layer
        self.temperature = float(temperature)
        if kind in ("mahalanobis", NORMED, FUSED):
            self.register_buffer("means", torch.zeros(centres or num_classes, dim))
            self.register_buffer("whitening", torch.eye(dim))  # W with W W^T = the precision matrix
        if kind == NORMED:
            self.register_buffer("origin", torch.zeros(dim))
        if kind in ("knn", FUSED):
            self.register_buffer("bank", torch.zeros(bank, dim))
        if kind == FUSED:  # each part's mean and spread on known images: (mahalanobis, knn) x (mean, std)
            self.register_buffer("scale", torch.tensor([0.0, 1.0, 0.0, 1.0]))

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        features, logits = features.float().flatten(1), logits.float()
        # reductions keep their axis and are squeezed after: OpenVINO's ONNX reader made a scalar of
        # ReduceLogSumExp/ReduceMax over the last axis of a dynamic batch
        top = logits.max(dim=-1, keepdim=True).values
        if self.kind == "msp":
            probs = torch.softmax(logits / self.temperature, dim=-1)
            return probs.max(dim=-1, keepdim=True).values[:, 0]
        if self.kind == "max_logit":
            return top[:, 0]
        if self.kind == "energy":
            return (top + torch.log(torch.exp(logits - top).sum(dim=-1, keepdim=True)))[:, 0]
        if self.kind == "mahalanobis":
            return self.mahalanobis(features)
        if self.kind == NORMED:
            return self.mahalanobis(normed(features, self.origin))
        if self.kind == "knn":
            return self.knn(features)
        return ((self.mahalanobis(features) - self.scale[0]) / self.scale[1]
                + (self.knn(features) - self.scale[2]) / self.scale[3])

    def mahalanobis(self, features: torch.Tensor) -> torch.Tensor:
        """Minus the squared Mahalanobis distance of each row of ``features`` to the nearest mean."""
        # the differences themselves, not ||fW||^2 - 2 fW.mW + ||mW||^2: far from every mean both
        # terms are large and float32 loses their difference (the runtimes then disagree)
        diff = (features @ self.whitening)[:, None, :] - (self.means @ self.whitening)[None]
        dist = diff.pow(2).sum(-1)
        return -dist.min(dim=-1, keepdim=True).values[:, 0]

    def knn(self, features: torch.Tensor) -> torch.Tensor:
        """The cosine similarity of each row of ``features`` to its ``k``-th nearest bank row."""
        unit = nn.functional.normalize(features, dim=-1)
        sims = unit @ self.bank.T
        return sims.topk(min(self.k, self.bank.shape[0]), dim=-1).values[:, -1]


def normed(features: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """``features`` [N, D] moved by ``origin`` [D] and scaled to unit length: what :data:`NORMED` reads."""
    return nn.functional.normalize(features - origin, dim=-1)


def card_section(score: UnknownScore, threshold: float, tpr: float, measured: dict[str, Any]) -> dict[str, Any]:
    """The card's ``unknown`` section for a fitted ``score``."""
    return {"score": score.kind, **({"layer": score.layer} if score.layer else {}), "threshold": float(threshold),
            "tpr": float(tpr), **measured}


def check_section(section: Any, source: str) -> dict[str, Any]:
    """The card's ``unknown`` section, validated (:class:`ArtifactError` names the bad field)."""
    if not isinstance(section, dict):
        raise ArtifactError(f"{source}: unknown must be a JSON object")
    kind = section.get("score")
    if kind not in UNKNOWN_SCORES.names():
        raise ArtifactError(f"{source}: unknown.score must be one of {list(UNKNOWN_SCORES.names())}, got {kind!r}")
    layer = section.get("layer")
    if layer is not None and not (isinstance(layer, str) and len(layer) <= 200 and LAYER_NAME.fullmatch(layer)):
        raise ArtifactError(f"{source}: unknown.layer must name a module of the network (like blocks.6), got "
                            f"{str(layer)[:80]!r}")
    threshold, tpr = section.get("threshold"), section.get("tpr")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ArtifactError(f"{source}: unknown.threshold must be a finite number, got {threshold!r}")
    if isinstance(tpr, bool) or not isinstance(tpr, (int, float)) or not 0.0 < tpr < 1.0:
        raise ArtifactError(f"{source}: unknown.tpr must be a share in (0, 1), got {tpr!r}")
    quantiles = section.get("val_quantiles")
    if quantiles is not None and not (
            isinstance(quantiles, list) and 2 <= len(quantiles) <= 1001
            and all(not isinstance(q, bool) and isinstance(q, (int, float)) and math.isfinite(q) for q in quantiles)
            and all(a <= b for a, b in zip(quantiles, quantiles[1:]))):
        raise ArtifactError(f"{source}: unknown.val_quantiles must be a rising list of 2 to 1001 finite numbers")
    return dict(section)


def threshold_for(section: dict[str, Any], tpr: float) -> float:
    """The threshold that accepts the share ``tpr`` of the model's val images: the stored one at
    the TPR it was set at, else read from the val scores' stored percentiles (interpolated).

    Example:
        >>> threshold_for({"threshold": 0.5, "tpr": 0.95, "val_quantiles": [0.0, 1.0, 2.0]}, 0.75)
        0.5
    """
    if not 0.0 < tpr <= 1.0:
        raise ConfigError(f"--threshold-tpr must be in (0, 1], got {tpr}")
    if abs(tpr - float(section["tpr"])) < 1e-9:
        return float(section["threshold"])
    quantiles = section.get("val_quantiles")
    if not quantiles:
        raise ConfigError("this model's card keeps no val score percentiles: retrain it to move its threshold")
    levels = [i / (len(quantiles) - 1) for i in range(len(quantiles))]
    return float(np.interp(1.0 - tpr, levels, quantiles))


def save_score(directory: str | Path, score: UnknownScore) -> None:
    """Write the score's statistics to ``unknown.safetensors`` (atomically, no link followed);
    a score with none (the logit scores) writes an empty file, so the folder says which it is."""
    state = {k: v.detach().cpu().float().contiguous() for k, v in score.state_dict().items()}
    with atomic_path(Path(directory) / UNKNOWN_FILE) as tmp:
        save_file(state, str(tmp), metadata={"score": score.kind, "layer": score.layer or ""})


def load_score(directory: str | Path, section: dict[str, Any], num_classes: int, dim: int,
               temperature: float = 1.0) -> UnknownScore:
    """The fitted score of a model folder, its file checked against the card before it is read:
    only the tensors ``section['score']`` has, of the shapes this classifier gives them (``dim``:
    the width of the features the card's ``layer`` gives, or of the classifier's input)."""
    path = Path(directory) / UNKNOWN_FILE
    kind = section["score"]
    if path.is_symlink():
        raise ArtifactError(f"{path} is a link; a model folder's files are read only as real files: copy the "
                            "file itself into the folder")
    if not path.is_file():
        raise ArtifactError(f"{path} is missing (model.json names an unknown-score); copy the whole model "
                            "folder, or retrain")
    expected = _shapes(kind, num_classes, dim)
    try:
        with safe_open(str(path), framework="pt") as fh:
            shapes = {name: list(fh.get_slice(name).get_shape()) for name in fh.keys()}
            dtypes = {name: fh.get_slice(name).get_dtype() for name in fh.keys()}
            written_for = (fh.metadata() or {}).get("layer")
    except Exception as exc:
        raise ArtifactError(f"{path} is not a valid safetensors file: {exc}") from None
    if written_for is not None and (written_for or None) != section.get("layer"):
        # files written before the layer existed carry no "layer": nothing to compare
        raise ArtifactError(f"{path} holds statistics of the features of {written_for or 'the classifier input'!r} "
                            f"but model.json reads {section.get('layer') or 'the classifier input'!r}; the files do "
                            "not belong together")
    if any(d != "F32" for d in dtypes.values()):
        raise ArtifactError(f"{path} holds tensors that are not float32 ({dtypes}); visiontune writes float32")
    if set(shapes) != set(expected) or any(not _fits(shapes[k], expected[k]) for k in expected) or (
            "means" in shapes and shapes["means"][0] not in (1, num_classes)):
        raise ArtifactError(f"{path} does not hold the {kind} statistics of a {num_classes}-class model with "
                            f"{dim} features (found {shapes}); the files do not belong together")
    state = load_file(str(path), device="cpu")
    bank = shapes.get("bank", [0])[0]
    centres = shapes.get("means", [0])[0]
    score = UnknownScore(kind, num_classes, dim, temperature, bank=bank, centres=centres, layer=section.get("layer"))
    score.load_state_dict(state, strict=True)
    if not all(torch.isfinite(t).all() for t in state.values()):
        raise ArtifactError(f"{path} holds non-finite statistics; retrain the model")
    scale = state.get("scale")
    if scale is not None and any(float(scale[i + 1]) < min_spread(float(scale[i])) * (1 - 1e-6) for i in (0, 2)):
        raise ArtifactError(f"{path} divides a part of the score by a spread under the least visiontune writes "
                            f"({scale.tolist()}); retrain the model")
    return score.eval()


def score_of(model: nn.Module, card: Any) -> UnknownScore | None:
    """The unknown-score a model's card names, read from its folder for ``model`` (its classifier's
    width), or None when the card names none (or is an exported graph's, with no folder or architecture)."""
    if not card.unknown or card.model_dir is None or card.architecture is None:
        return None
    layer = card.unknown.get("layer")
    width = (classifier_width(model, card.architecture.classifier) if layer is None
             else layer_width(model, layer, card.preprocessing.input_size))
    return load_score(card.model_dir, card.unknown, card.num_classes, width, card.temperature)


def _shapes(kind: str, num_classes: int, dim: int) -> dict[str, list[int | None]]:
    """Expected tensor shapes (None: any size from 1 to its bound)."""
    if kind == "mahalanobis":
        return {"means": [None, dim], "whitening": [dim, dim]}
    if kind == NORMED:
        return {"means": [None, dim], "whitening": [dim, dim], "origin": [dim]}
    if kind == "knn":
        return {"bank": [None, dim]}
    if kind == FUSED:
        return {"means": [None, dim], "whitening": [dim, dim], "bank": [None, dim], "scale": [4]}
    return {}


def _fits(shape: list[int], expected: list[int | None]) -> bool:
    if len(shape) != len(expected):
        return False
    return all((e is None and 1 <= s <= MAX_BANK) or s == e for s, e in zip(shape, expected))


def pooled(output: torch.Tensor) -> torch.Tensor:
    """A module's output as one row per image: ``[N, C, H, W]`` averaged over its positions,
    ``[N, T, D]`` over its tokens, anything else flattened."""
    output = output.float()
    if output.dim() == 4:
        return output.mean(dim=(2, 3))
    # a copy: a later in-place operation of the network must not change what was read
    return output.mean(dim=1) if output.dim() == 3 else output.flatten(1).clone()


def tapped_views(model: nn.Module, classifier: str, x: torch.Tensor, tta: bool | str | None = None,
                 layers: tuple[str | None, ...] = (None,)) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """One forward pass per view of ``tta`` (:mod:`visiontune.models.tta`, the image first), each
    kept apart: per view, the features of each of ``layers`` (None: the classifier's input; a name:
    that module's :func:`pooled` output), each ``[N, D]``, and the logits ``[N, C]`` in fp32."""
    seen: dict[str | None, list[torch.Tensor]] = {layer: [] for layer in layers}
    hooks = []
    try:
        for layer in layers:
            if layer is None:
                hooks.append(model.get_submodule(classifier).register_forward_pre_hook(
                    lambda module, inputs: seen[None].append(inputs[0].float().flatten(1))))
            else:
                hooks.append(model.get_submodule(layer).register_forward_hook(
                    lambda module, inputs, output, layer=layer: seen[layer].append(pooled(output))))
        logits = [model(v).float() for v in views(x, tta)]
    finally:
        for hook in hooks:
            hook.remove()
    return [([seen[layer][i] for layer in layers], z) for i, z in enumerate(logits)]


def tapped_forward(model: nn.Module, classifier: str, x: torch.Tensor, tta: bool | str | None = None,
                   layers: tuple[str | None, ...] = (None,)) -> tuple[list[torch.Tensor], torch.Tensor]:
    """:func:`tapped_views` averaged, as predictions are made: the features of each of ``layers``,
    each ``[N, D]``, and the logits ``[N, C]``."""
    per_view = [(dict(zip(layers, fs)), z) for fs, z in tapped_views(model, classifier, x, tta, layers)]
    features, logits = mean_of_taps(per_view)
    return [features[layer] for layer in layers], logits


def mean_of_taps(per_view: list[tuple[dict[str | None, torch.Tensor], torch.Tensor]]
                 ) -> tuple[dict[str | None, torch.Tensor], torch.Tensor]:
    """The views' mean of taps kept apart (``({layer: [n, D]}, logits [n, C])`` per view): features
    by their mean, logits by :func:`~visiontune.models.tta.mean_of_views`; what a model predicting
    with those views reads (:func:`tapped_forward` averages so too)."""
    layers = per_view[0][0].keys()
    return ({layer: torch.stack([features[layer] for features, _ in per_view]).mean(0) for layer in layers},
            mean_of_views([z for _, z in per_view]))


def features_and_logits(model: nn.Module, classifier: str, x: torch.Tensor, tta: bool | str | None = None,
                        layer: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The features an unknown-score reads (``layer``'s pooled output, or the classifier's input)
    and the logits ``[N, C]`` of one forward pass (see :func:`tapped_forward`)."""
    features, logits = tapped_forward(model, classifier, x, tta, (layer,))
    return features[0], logits


def feature_layer(model: nn.Module, classifier: str, input_size: tuple[int, ...]) -> str | None:
    """The second source of features for the unknown-score: the last stage a timm network lists in
    its ``feature_info`` (EfficientNet's last block, ResNet's ``layer4``), None for a network that
    lists none, whose last stage is the classifier itself, or whose pooled output is not the
    stage's channels (a channels-last stage, as Swin's) once tried on a blank image of ``input_size``."""
    info = getattr(model, "feature_info", None)
    try:
        name, channels = (info[-1]["module"], info[-1].get("num_chs")) if info else (None, None)
    except (TypeError, KeyError, IndexError, AttributeError):
        return None
    if not isinstance(name, str) or not LAYER_NAME.fullmatch(name) or name == classifier:
        return None
    try:
        width = layer_width(model, name, input_size)
    except ArtifactError:
        return None
    return name if width == channels else None


@torch.no_grad()
def layer_width(model: nn.Module, layer: str, input_size: tuple[int, ...]) -> int:
    """Features ``layer`` gives per image, from one forward pass of a blank image of ``input_size``
    (C, H, W). Refused (:class:`ArtifactError`): a name that is not one of the network's registered
    modules, a module that runs other than once per pass or gives no tensor of 2+ dimensions, and a
    width outside 1..MAX_DIM."""
    module = dict(model.named_modules()).get(layer) if layer else None
    if module is None or module is model:
        raise ArtifactError(f"the unknown-score reads the layer {layer!r}, which this network does not have; "
                            "the card and the weights do not belong together")
    seen: list[Any] = []
    hook = module.register_forward_hook(lambda m, inputs, output: seen.append(output))
    training = model.training
    try:
        model.eval()
        param = next(model.parameters(), None)
        model(torch.zeros(1, *input_size, device=param.device if param is not None else None))
    except Exception as exc:  # noqa: BLE001 - a network that cannot run the probe: the card's fault, named
        raise ArtifactError(f"the network does not run with the unknown-score's layer {layer!r} tapped "
                            f"({type(exc).__name__}: {str(exc)[:200]}); retrain the model") from None
    finally:
        hook.remove()
        model.train(training)
    if len(seen) != 1 or not isinstance(seen[0], torch.Tensor) or seen[0].dim() < 2:
        raise ArtifactError(f"the layer {layer!r} does not give one tensor per image once per pass (it ran "
                            f"{len(seen)} times); an unknown-score cannot read it: retrain the model")
    width = pooled(seen[0]).shape[1]
    if not 1 <= width <= MAX_DIM:
        raise ArtifactError(f"the layer {layer!r} gives {width} features per image; an unknown-score reads 1 to "
                            f"{MAX_DIM}")
    return width


class ScoredModel(nn.Module):
    """``model`` whose output gains a last column: the unknown-score of each image (``tta``: of its
    views together, features and logits averaged as :func:`features_and_logits` does).

    The features (the classifier's input, or the score's ``layer``) are taken with a forward hook, so
    any architecture whose card names its classifier works; the exported graphs are traced through
    this module.
    """

    def __init__(self, model: nn.Module, classifier: str, score: UnknownScore, tta: bool | str | None = None):
        super().__init__()
        self.model, self.score, self.classifier, self.tta = model, score, classifier, tta_mode(tta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, logits = features_and_logits(self.model, self.classifier, x, self.tta, self.score.layer)
        # the score in float32 whatever the network ran at: under bf16 autocast its distances keep
        # three digits, and the threshold was set on float32 scores
        with torch.autocast(x.device.type, enabled=False):
            score = self.score(features.float(), logits.float())
        return torch.cat([logits, score[:, None]], dim=1)


def classifier_width(model: nn.Module, classifier: str) -> int:
    """Features the classifier layer takes."""
    head = model.get_submodule(classifier)
    width = getattr(head, "in_features", None)
    if not isinstance(width, int) or not 1 <= width <= MAX_DIM:
        raise ArtifactError(f"the classifier {classifier!r} has no usable input width for an unknown-score")
    return width
