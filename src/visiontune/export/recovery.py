"""Recovery after pruning: BatchNorm re-estimation, least-squares reconstruction of the layers
fed by cut channels, and a short fine-tune distilled from the unpruned model (the teacher)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data.dataset import ImageListDataset, default_workers
from ..data.transforms import train_transform
from ..models.card import ModelCard
from ..task import Task
from ..training.optim import OptimizerSettings, make_optimizer

# Recovery learning rate. Measured before reconstruction existed (0.3 cut, 2 rounds x 3 epochs):
# CIFAR-10 subset (1,600 images, 64 px): 1e-3 -> +1.0 pt, 1e-4 -> -16.3 pt;
# hymenoptera (123 images, 224 px): 1e-4 -> -3.3 pt, 3e-4 -> -5.7 pt. Bigger datasets need the
# larger step to relearn what the cut removed, tiny ones lose their pretrained features with it.
# With reconstruction, CIFAR at 1e-3 stays level (-0.75 to +0.25 pt) and needs the fine-tune
# (-15.3 pt without it), while hymenoptera is best reconstructed alone (-1.6 pt; with a 1e-4
# fine-tune: -4.1 pt).
RECOVERY_LR = 1e-3


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader) -> None:
    """Re-estimate every BatchNorm's running statistics on training images (EagleEye's adaptive BN).

    Removing channels shifts the inputs of the layers after them; their stored statistics no
    longer fit, which alone can take a pruned network to chance accuracy before any training
    (measured on hymenoptera, one 0.3 cut: 51.6% val accuracy as cut, 77.9% after re-estimation).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch
    model.train()
    for images, _ in loader:
        model(images)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.eval()


class _Stop(Exception):
    """Ends a forward pass once the layer of interest has run."""


@torch.no_grad()
def _norms_after_convs(model: nn.Module, images: torch.Tensor) -> dict[str, str]:
    """{conv name: name of the BatchNorm that takes that conv's output as its input}.

    Found by running the model once, not from module order, which need not be execution order.
    """
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # tensors kept alive so their ids stay unique
    found: dict[str, str] = {}

    def remember(name: str):
        return lambda module, inputs, output: outputs.__setitem__(id(output), (name, output))

    def match(name: str):
        def hook(module, inputs):
            source = outputs.get(id(inputs[0]))
            if source is not None:
                found[source[0]] = name
        return hook

    hooks = [module.register_forward_hook(remember(name)) if isinstance(module, nn.Conv2d)
             else module.register_forward_pre_hook(match(name))
             for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.BatchNorm2d))]
    try:
        model.eval()(images[:2])
    finally:
        for hook in hooks:
            hook.remove()
    return found


def _layer_io(student: nn.Module, conv: nn.Conv2d, teacher: nn.Module, twin: nn.Conv2d,
              images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The student conv's input and the teacher conv's output on ``images``, as (pixels, channels)."""
    caught: dict[str, torch.Tensor] = {}

    def catch(key: str, value: torch.Tensor) -> None:
        caught[key] = value
        raise _Stop  # the rest of the network is not needed

    hooks = [conv.register_forward_hook(lambda m, inp, out: catch("x", inp[0])),
             twin.register_forward_hook(lambda m, inp, out: catch("y", out))]
    try:
        for net in (student, teacher):
            try:
                net(images)
            except _Stop:
                pass
    finally:
        for hook in hooks:
            hook.remove()
    return tuple(caught[k].permute(0, 2, 3, 1).reshape(-1, caught[k].shape[1]).double() for k in "xy")


@torch.no_grad()
def _ridge_refit(conv: nn.Conv2d, gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> None:
    """Set ``conv`` (1x1) to argmin |XW - Y|^2 + s |W - W_cut|^2 from X'X and X'Y (bias last)."""
    prior = conv.weight.detach().double().flatten(1).T
    if conv.bias is not None:
        prior = torch.cat([prior, conv.bias.detach().double()[None]], 0)
    strength = ridge * gram.diagonal().mean()
    fitted = torch.linalg.solve(gram + strength * torch.eye(len(gram), dtype=gram.dtype), cross + strength * prior)
    conv.weight.copy_(fitted[:conv.in_channels].T.reshape(conv.weight.shape))
    if conv.bias is not None:
        conv.bias.copy_(fitted[-1])


@torch.no_grad()
def reconstruct(student: nn.Module, teacher: nn.Module, loader, ridge: float = 1e-3) -> list[str]:
    """Refit every 1x1 conv whose inputs were cut so that it reproduces the teacher's output.

    Least-squares reconstruction as in ThiNet / He et al. 2017 ("Channel pruning for accelerating
    very deep neural networks"): the kept channels are recombined to stand in for the removed
    ones. Layers are refit in network order on the student's own inputs, so each fit also absorbs
    the error of the layers before it. Every pixel is a sample, so a hundred images give tens of
    thousands of equations: this recovers from a few images where gradient fine-tuning overfits
    them. The ridge term pulls towards the cut weights (relative strength ``ridge``).
    Measured on hymenoptera (123 training images, a 0.3 cut in 2 rounds, no fine-tune): 95.9% val
    accuracy (unpruned: 97.5%); the refits added 1.6 and 4.1 points to BN re-estimation alone.
    The BatchNorm after a refit conv is reset to the teacher's, since its input is the teacher's
    again. Returns the names of the refit layers.
    """
    student.eval()
    teacher.eval()
    twins = dict(teacher.named_modules())
    first = next(iter(loader), None)
    if first is None:
        return []
    norms = _norms_after_convs(student, first[0])
    refit: list[str] = []
    for name, conv in list(student.named_modules()):
        twin = twins.get(name)
        if not (isinstance(conv, nn.Conv2d) and isinstance(twin, nn.Conv2d) and conv.kernel_size == (1, 1)
                and conv.groups == 1 and twin.in_channels > conv.in_channels
                and twin.out_channels == conv.out_channels):
            continue
        gram = cross = None
        for images, _ in loader:
            x, y = _layer_io(student, conv, teacher, twin, images)
            if conv.bias is not None:
                x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
            gram = x.T @ x if gram is None else gram + x.T @ x
            cross = x.T @ y if cross is None else cross + x.T @ y
        _ridge_refit(conv, gram, cross, ridge)
        norm = norms.get(name)
        if norm is not None and isinstance(twins.get(norm), nn.BatchNorm2d):
            own, theirs = student.get_submodule(norm), twins[norm]
            if own.num_features == theirs.num_features:
                own.load_state_dict(theirs.state_dict())
        refit.append(name)
    return refit


def task_loss(logits: torch.Tensor, labels: torch.Tensor, task: Task) -> torch.Tensor:
    """The model's ``task``'s unweighted training loss of a batch (:meth:`Task.loss`): cross-entropy of
    class indices, or binary cross-entropy per label of multi-hot targets ``[B, C]``."""
    return task.loss()(logits.float(), task.targets(labels, logits.shape[1]).to(logits.device))


def distill_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor, task: Task,
                 temperature: float = 2.0) -> torch.Tensor:
    """Half the task loss, half the divergence from the teacher's temperature-softened outputs
    (:meth:`Task.distillation`: softmax KL; for multi-hot targets each label's binary cross-entropy
    to the teacher's sigmoid).

    The teacher's soft labels carry more signal per image than the hard ones, which matters on
    small datasets. (Also matching the teacher's pre-logit features was tried: no better, within
    the run-to-run spread on hymenoptera.)

    Example:
        >>> from visiontune.task import get_task
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> loss = distill_loss(logits, torch.tensor([0, 1]), logits, get_task("single"))
        >>> round(float(loss), 4)  # agreeing with the teacher adds nothing to half the cross-entropy
        0.11
    """
    kd = task.distillation(logits, teacher_logits, temperature)
    return 0.5 * task_loss(logits, labels, task) + 0.5 * kd * temperature**2


def finetune(model: nn.Module, card: ModelCard, samples: list[tuple[str, int]], epochs: int,
             batch_size: int = 32, lr: float = RECOVERY_LR, teacher: nn.Module | None = None,
             temperature: float = 2.0, augment: str = "standard", log=print) -> nn.Module:
    """Short recovery fine-tune of all layers (AdamW, one-cycle LR, random resized crops).

    With a ``teacher`` (the unpruned model) the loss is :func:`distill_loss`; both networks see
    the same augmented batch. The best ``lr`` depends on the data (see :data:`RECOVERY_LR`).
    """
    if epochs <= 0 or not samples:
        return model
    pre = card.preprocessing
    workers = default_workers(None)
    loader = DataLoader(ImageListDataset(samples, train_transform(pre, augment), pre.draft_size()),
                        batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0,
                        drop_last=len(samples) > batch_size)
    optimizer = make_optimizer(model.parameters(), OptimizerSettings("adamw", lr, weight_decay=0.01))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=max(1, epochs * len(loader)),
                                                   pct_start=0.1)
    for epoch in range(epochs):
        model.train()
        total, seen = 0.0, 0
        for images, labels in loader:
            logits = model(images)
            if teacher is None:
                loss = task_loss(logits, labels, card.task)
            else:
                with torch.no_grad():
                    teacher_logits = teacher(images)
                loss = distill_loss(logits, labels, teacher_logits, card.task, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total, seen = total + loss.detach().item() * len(labels), seen + len(labels)
        log(f"recovery epoch {epoch + 1}/{epochs}  loss {total / max(seen, 1):.4f}")
    return model.eval()

