"""Structured channel pruning with ``torch-pruning``, and pickle-free pruned models.

Saving a pruned network, pickle-free: the weights stay a plain ``model.safetensors`` and the
card gains ``"pruned": {"shapes": {module: {in_channels, out_channels, groups, ...}}}``;
:func:`visiontune.models.artifact.load_model` rebuilds the *original* architecture from the
card, shrinks each listed layer to its recorded channel counts
(:mod:`visiontune.models.shapes`) and loads the weights strictly.
"""

from __future__ import annotations

import copy
import itertools
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..core.errors import ExportError
from ..data.dataset import ImageListDataset
from ..data.preprocess import Preprocessing
from ..data.transforms import eval_transform
from ..models.artifact import save_model
from ..models.card import ModelCard
from ..models.shapes import layer_shapes
from ..task import Task
from .deploy import input_shape
from .recovery import finetune, recalibrate_batchnorm, reconstruct, task_loss
from .registry import PRUNE_IMPORTANCES


def decoded_batches(samples: list[tuple[str, int]], pre: Preprocessing, batch_size: int = 32
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches in the eval preprocessing, decoded once and kept in memory."""
    return list(DataLoader(ImageListDataset(samples, eval_transform(pre), pre.draft_size()), batch_size=batch_size))


def save_pruned(directory: str | os.PathLike, model: nn.Module, card: ModelCard, info: dict[str, Any]) -> Path:
    """Write a pruned model as model.safetensors + model.json with its layer shapes (without the
    unknown-score: pruning changed the features its statistics were fitted on)."""
    return save_model(directory, model, card.replace(pruned={**info, "shapes": layer_shapes(model)}, export=None,
                                                     unknown=None))


def count_macs(model: nn.Module, card: ModelCard) -> tuple[int, int]:
    """(MACs, parameters) of one forward pass at the model's input size."""
    import torch_pruning as tp  # lazy: only compress --prune needs torch-pruning

    macs, params = tp.utils.count_ops_and_params(copy.deepcopy(model).eval(), torch.zeros(1, *input_shape(card)))
    return int(macs), int(params)


def residual_layers(model: nn.Module, example: torch.Tensor, ignored: list[nn.Module]) -> list[nn.Module]:
    """Convs whose output channels are tied together by residual additions.

    Removing a channel of a residual stream removes it from every block that writes to that
    stream at once; measured on EfficientNet-Lite0 (CIFAR-10, 64 px) this costs far more
    accuracy per MAC saved than pruning the expansion channels inside blocks. A dependency
    group with more than one dense (non-depthwise) conv producing its channels is such a stream.
    """
    import torch_pruning as tp  # lazy: as above

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    tied: list[nn.Module] = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]):
        producers = {id(dep.target.module): dep.target.module for dep, _ in group
                     if isinstance(dep.target.module, nn.Conv2d) and dep.target.module.groups == 1
                     and graph.is_out_channel_pruning_fn(dep.handler)}
        if len(producers) > 1:
            tied.extend(producers.values())
    return tied


def head_input_layers(model: nn.Module, example: torch.Tensor, head: nn.Module) -> list[nn.Module]:
    """Convs that produce the classifier's input features.

    Left whole: cutting them would delete columns of the classifier, the one layer trained
    only on the user's classes, for a small share of the MACs (320 -> 1280 at 7x7 on
    EfficientNet-Lite0: 5% of them).
    """
    import torch_pruning as tp  # lazy: as above

    if not isinstance(head, nn.Linear):
        return []
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    group = graph.get_pruning_group(head, tp.prune_linear_in_channels, idxs=[0])
    return [dep.target.module for dep, _ in group if isinstance(dep.target.module, nn.Conv2d)
            and graph.is_out_channel_pruning_fn(dep.handler)]


def _taylor_gradients(model: nn.Module, loader, task: Task) -> None:
    """Loss gradients on a few hundred training images: what Taylor importance scores channels by."""
    model.eval()
    model.zero_grad(set_to_none=True)
    for images, labels in loader:
        task_loss(model(images), labels, task).backward()


def _fisher_gradients(model: nn.Module, loader, task: Task, limit: int = 128) -> None:
    """Leave the diagonal empirical Fisher (mean per-sample squared loss gradient) in ``.grad``.

    What torch-pruning's Hessian (Optimal Brain Damage) importance scores channels by:
    w^2 * H estimates the loss increase of removing a weight even at convergence, where the
    first-order Taylor term (mean gradient) is close to zero and mostly noise. Measured on
    hymenoptera (one 0.3 cut, BN re-estimated, before recovery): 87.7% val accuracy vs 77.9%
    with Taylor; weight magnitude ended at 59.8% even after recovery.
    """
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    fisher = [torch.zeros_like(p) for p in params]
    pairs = itertools.islice(((x, y) for images, labels in loader for x, y in zip(images, labels)), limit)
    seen = 0
    for image, label in pairs:
        model.zero_grad(set_to_none=True)
        task_loss(model(image[None]), label[None], task).backward()
        for acc, p in zip(fisher, params):
            if p.grad is not None:
                acc += p.grad.pow(2)
        seen += 1
    for acc, p in zip(fisher, params):
        p.grad = acc / max(seen, 1)


def attention_layers(model: nn.Module) -> list[str]:
    """Names of the multi-head attention layers (ViT, DeiT, Swin; anything with ``num_heads``)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention)
            or (isinstance(getattr(m, "num_heads", None), int) and any(isinstance(c, nn.Linear) for c in m.children()))]


def check_prunable(model: nn.Module, card: ModelCard) -> None:
    """Refuse, before any work, a model whose channels cannot be cut safely.

    Channel pruning of an attention layer must remove whole heads and rewrite its ``num_heads``
    and head size; cutting single channels, as for convolutions, breaks the reshape into heads
    (``shape '[30, 197, 3, 3, 64]' is invalid``), so transformers are refused by name.
    """
    attention = attention_layers(model)
    if attention:
        raise ExportError(f"--prune removes convolution channels; {card.architecture.name} has {len(attention)} "
                          f"attention layer(s) (e.g. {attention[0]}) whose heads channel pruning would cut through. "
                          "Pruning transformers is not supported; --quantize int8 is")


def check_prune_args(ratio: float, steps: int, lr: float | None = None, epochs: int = 0) -> None:
    """Refuse impossible pruning settings (before any export or measurement starts)."""
    if not 0.0 < ratio < 1.0:
        raise ExportError(f"--prune RATIO must be in (0, 1), got {ratio}")
    if steps < 1:
        raise ExportError(f"--prune-steps must be at least 1, got {steps}")
    if epochs < 0:
        raise ExportError(f"--finetune-epochs must be >= 0 (0: least-squares reconstruction alone), got {epochs}")
    if lr is not None and not lr > 0:
        raise ExportError(f"--recovery-lr must be > 0 (e.g. 1e-3, or 1e-4 for a few hundred images), got {lr}")


def prune_and_recover(model: nn.Module, card: ModelCard, ratio: float, samples: list[tuple[str, int]],
                      epochs: int, steps: int = 2, log=print, importance: str = "hessian",
                      **recovery: Any) -> nn.Module:
    """Remove ``ratio`` of the prunable channels in ``steps`` rounds, recovering after each.

    torch-pruning's dependency graph keeps coupled layers consistent (BN, depthwise convs whose
    channels are tied via groups); residual streams, the classifier and the layers producing its
    input are left whole (:func:`residual_layers`, :func:`head_input_layers`). Channels are ranked
    by ``importance`` (a name in :data:`~visiontune.export.registry.PRUNE_IMPORTANCES`) on training
    images. After each cut the BN
    statistics are re-estimated, the layers fed by cut channels are refit to the unpruned model's
    outputs by least squares (:func:`~visiontune.export.recovery.reconstruct`), and the network
    is fine-tuned for ``epochs``, distilled from the unpruned model
    (:func:`~visiontune.export.recovery.finetune`, which takes ``**recovery``).

    Example:
        prune_and_recover(model, card, 0.3, train_samples, epochs=3)
    """
    import torch_pruning as tp  # lazy: as above

    check_prune_args(ratio, steps, epochs=epochs)
    if importance not in PRUNE_IMPORTANCES:
        raise ExportError(f"unknown pruning importance {importance!r}; choose one of: "
                          f"{', '.join(PRUNE_IMPORTANCES)}")
    if not samples:
        raise ExportError("pruning needs the training images (channel importance, recovery); the training "
                          "data in model.json is gone")
    torch.manual_seed(0)  # recovery shuffles and augments: the same call gives the same model
    example = torch.zeros(1, *input_shape(card))
    teacher = copy.deepcopy(model).eval()
    head = model.get_submodule(card.architecture.classifier)
    ignored = [head, *residual_layers(model.eval(), example, [head]), *head_input_layers(model, example, head)]
    # decoded once and kept (at most 256 images): importance, BN re-estimation and the
    # reconstruction of every refit layer each pass over them again, every round
    scoring = decoded_batches(samples[::max(1, len(samples) // 256)], card.preprocessing)
    scorer_name, gradients = PRUNE_IMPORTANCES.get(importance)
    pruner = tp.pruner.MetaPruner(model, example, importance=getattr(tp.importance, scorer_name)(),
                                  pruning_ratio=ratio, iterative_steps=steps, ignored_layers=ignored)
    macs0, _ = count_macs(model, card)
    for step in range(steps):
        if gradients is not None:
            gradients(model, scoring, card.task)
        pruner.step()
        model.zero_grad(set_to_none=True)
        recalibrate_batchnorm(model, scoring)
        reconstruct(model, teacher, scoring)
        macs, _ = count_macs(model, card)
        log(f"prune round {step + 1}/{steps}: MACs {macs0 / 1e6:.1f}M -> {macs / 1e6:.1f}M; "
            f"recovering {epochs} epoch(s)")
        finetune(model, card, samples, epochs, teacher=teacher, log=log, **recovery)
    return model.eval()


# channel importances (PRUNE_IMPORTANCES): (torch_pruning.importance class, what leaves in .grad what it
# needs: ``fn(model, batches, task)``)
HESSIAN = ("GroupHessianImportance", _fisher_gradients)
TAYLOR = ("GroupTaylorImportance", _taylor_gradients)
MAGNITUDE = ("GroupMagnitudeImportance", None)
