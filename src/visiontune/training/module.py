"""The LightningModules: loss, metrics, discriminative learning rates and the schedule, for the
whole network (:class:`ClassifierModule`) or its classifier layer on cached features (:class:`HeadModule`).

It takes the few hyperparameters it uses, not the run's whole config; the loss, the metrics and
the mixed targets are its :class:`~visiontune.task.Task`'s.
"""

from __future__ import annotations

import math
from dataclasses import replace

import lightning as L
import torch
from torch import nn
from torchmetrics import Metric

from ..inference.runners import forward_logits
from ..models.groups import head_parameter_names
from ..task import Task, get_task
from .checkpoint_io import BODY_PHASE, HEAD_PHASE, PHASE_KEY, restore_rng, rng_state
from .distill import Teacher, distill_loss
from .optim import OptimizerSettings, ScheduleSettings, make_optimizer, make_scheduler, schedule_fn

NO_SUMS = {"loss": 0.0, "correct": 0.0, "rows": 0}


def valid_sums(sums: object) -> dict[str, float | torch.Tensor]:
    """An epoch's training sums read from a checkpoint (not trusted): three finite, consistent numbers
    (a loss >= 0, 0 <= correct <= rows), else none, said.

    Example:
        >>> valid_sums({"loss": 1.5, "correct": 2.0, "rows": 3})
        {'loss': 1.5, 'correct': 2.0, 'rows': 3}
        >>> valid_sums({"loss": float("nan"), "correct": 2.0, "rows": 3})
        warning: invalid running loss and accuracy in the checkpoint: the epoch's figures count from here
        {'loss': 0.0, 'correct': 0.0, 'rows': 0}
    """
    if sums is None:  # a checkpoint written before the sums were kept
        return dict(NO_SUMS)
    try:
        if not isinstance(sums, dict) or set(sums) != set(NO_SUMS):
            raise ValueError("not the sums' keys")
        values = {k: float(v) for k, v in sums.items() if not isinstance(v, (bool, str))}
        loss, correct, rows = values["loss"], values["correct"], values["rows"]
        if not (math.isfinite(loss) and loss >= 0 and rows == int(rows) and 0 <= correct <= rows):
            raise ValueError("out of range")
        return {"loss": loss, "correct": correct, "rows": int(rows)}
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError):
        print("warning: invalid running loss and accuracy in the checkpoint: the epoch's figures count from here")
        return dict(NO_SUMS)


class ClassifierModule(L.LightningModule):
    """Trains ``model`` (backbone + classifier) with per-group learning rates.

    Args:
        model: the network; its classification layer is the submodule named ``classifier``.
        classifier: dotted name of the classification layer (it trains at the peak LR).
        body_groups: parameter names of the body from stem to top; each group gets its own LR.
        body_lrs: one LR per body group.
        optimizer: optimizer name, peak LR, weight decay, momentum.
        schedule: LR schedule over the run.
        label_smoothing: of the cross-entropy loss (single-label; see :meth:`Task.loss <visiontune.task.Task.loss>`).
        class_weights: optional per-class loss weights (multi-label: per-label ``pos_weight``).
        freeze_bn_stats: keep every BatchNorm's running statistics (``--bn-stats frozen``).
        compile: train a ``torch.compile`` view of the model.
        mixup: mixup and cutmix alphas (timm's ``Mixup``; both 0: off).
        tta: validate with the test-time augmentation every prediction of the model will use (a mode of
            :mod:`visiontune.models.tta`; ``auto`` validates with one view, the choice comes after training).
        teacher: a trained model whose softened probabilities the training on images also learns
            from (:mod:`~visiontune.training.distill`), with ``distill`` = (alpha, temperature).
        early: ``(side, steps)``: the first ``steps`` optimizer steps train on the batches resized to
            ``side`` px (``--early-size``/``--early-steps``, progressive resizing), or None.
        task: what the model answers (a :class:`~visiontune.task.Task` or its name): its loss,
            its metrics (``accuracy`` and the ``--select-metric`` ones, logged as ``val_<name>``)
            and its mixed targets.
    """

    def __init__(self, model: nn.Module, classifier: str, body_groups: list[list[str]], body_lrs: list[float],
                 optimizer: OptimizerSettings, schedule: ScheduleSettings, label_smoothing: float = 0.0,
                 class_weights: torch.Tensor | None = None, freeze_bn_stats: bool = False, compile: bool = False,
                 mixup: tuple[float, float] = (0.0, 0.0), tta: str = "", task: str | Task = "single",
                 teacher: Teacher | None = None, distill: tuple[float, float] = (0.5, 2.0),
                 early: tuple[int, int] | None = None):
        super().__init__()
        self.early = early
        self.teacher, self.distill = teacher, distill  # a plain attribute: its weights stay out of checkpoints
        self.model = model
        self.classifier = classifier
        self.body_groups = body_groups
        self.body_lrs = body_lrs
        self.optimizer_settings = optimizer
        self.schedule_settings = schedule
        self.freeze_bn_stats = freeze_bn_stats
        # torch.compile'd view of the same module: parameters and state_dict stay model's own
        self.forward_fn = torch.compile(model) if compile else model
        num_classes = model.get_submodule(classifier).out_features
        self.task = get_task(task)
        self.loss_fn = self.task.loss(class_weights, label_smoothing)
        self.tta = tta
        self.mixup_fn = None
        if any(mixup):  # soft targets: the label smoothing moves into the mixed labels
            from timm.data import Mixup  # lazy: only runs that mix images need it

            self.mixup_fn = Mixup(mixup_alpha=mixup[0], cutmix_alpha=mixup[1], num_classes=num_classes,
                                  **self.task.mixup_options(label_smoothing))
        # the epoch's training loss and accuracy, summed from its first batch and logged after its last
        # (or the batch a stop came after); kept in checkpoints with the loader's position, so a run
        # stopped mid-epoch resumes to the same figures as well as the same weights
        self.epoch_sums: dict[str, float | torch.Tensor] = dict(NO_SUMS)
        val_metrics = self.task.metrics(num_classes)
        self.val_acc = val_metrics.pop("accuracy")
        # model selection metrics (--select-metric), each a submodule val_<name> (moved with the model)
        self.extra_metrics = tuple(val_metrics)
        for name, metric in val_metrics.items():
            setattr(self, f"val_{name}", metric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_fn(x)

    def train(self, mode: bool = True):
        """Keep BatchNorm layers whose parameters are frozen in eval mode.

        Lightning calls ``train()`` every epoch; a frozen BN in train mode would keep updating its
        running statistics from the new data and drift away from the weights that use them.
        """
        super().train(mode)
        if mode:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._NormBase):
                    params = list(module.parameters(recurse=False))
                    if self.freeze_bn_stats or (params and not any(p.requires_grad for p in params)):
                        module.eval()
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning keeps whatever mode the module is in (feature extraction leaves it in eval):
        # set train mode explicitly, which also re-applies the BatchNorm rule above.
        self.train()

    #: which trainer's checkpoints this module writes (see :data:`~visiontune.training.checkpoint_io.PHASE_KEY`)
    phase = BODY_PHASE

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lightning does not store RNG state; without it dropout/drop-path differ after --resume
        checkpoint["visiontune_rng"] = rng_state()
        checkpoint[PHASE_KEY] = self.phase
        checkpoint["visiontune_epoch_sums"] = {k: int(v) if k == "rows" else float(v)
                                               for k, v in self.epoch_sums.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_rng(checkpoint.get("visiontune_rng"))
        self.epoch_sums = valid_sums(checkpoint.get("visiontune_epoch_sums"))

    def count(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Add one training batch to the epoch's sums (``epoch_sums``), as tensors on the device
        (in float64): the step does not wait for them."""
        with torch.no_grad():
            self.epoch_sums["loss"] = self.epoch_sums["loss"] + loss.detach().double() * len(y)
            self.epoch_sums["correct"] = self.epoch_sums["correct"] + self.task.accuracy(logits, y).double() * len(y)
            self.epoch_sums["rows"] = self.epoch_sums["rows"] + len(y)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # Lightning counts a resumed epoch's batches on from where its checkpoint was: 0 is a new epoch
        if batch_idx == 0:
            self.epoch_sums = dict(NO_SUMS)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # after the callbacks' hook: a deadline's stop after this batch is already known
        if batch_idx + 1 < self.trainer.num_training_batches and not self.trainer.should_stop:
            return
        rows = max(1, int(self.epoch_sums["rows"]))
        # every process's own mean, averaged across processes (their shards are padded to one length)
        self.log("train_loss", float(self.epoch_sums["loss"]) / rows, on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=1, sync_dist=True)
        self.log("train_accuracy", float(self.epoch_sums["correct"]) / rows, on_step=False, on_epoch=True,
                 prog_bar=True, batch_size=1, sync_dist=True)

    def _step(self, batch, metric: Metric | None, prefix: str) -> torch.Tensor:
        x, y = batch
        if prefix == "train" and x.dim() == 4 and len(y) == 1:
            # an epoch's last batch of one image (41 images in batches of 8): BatchNorm in training
            # mode cannot normalise one value per channel, so the image trains with its mirror image
            x, y = torch.cat([x, x.flip(-1)]), torch.cat([y, y])
        if prefix == "train" and self.early is not None and self.global_step < self.early[1] and x.dim() == 4:
            x = early_view(x, self.early[0])
        if x.device.type in ("cpu", "cuda") and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if prefix == "train" and self.mixup_fn is not None and len(y) % 2 == 0:  # timm mixes pairs
            x, soft = self.mixup_fn(x, y)
            logits = self(x)
            loss = self.task.soft_loss(self.loss_fn, logits, soft)
        else:
            logits = forward_logits(self, x, tta=self.tta if prefix == "val" else None)
            loss = self.loss_fn(logits.float(), y)
        if prefix == "train":
            if self.teacher is not None:
                loss = distill_loss(loss, logits, self.teacher(x), *self.distill)
            self.count(loss, logits, y)
            # the bar's running figure; the epoch's are logged from the sums (on_train_batch_end)
            self.log("train_loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(y))
            return loss
        scores, y_metric = self.task.metric_inputs(logits, y)
        metric(scores, y_metric)
        self._extra_val_metrics(scores, y_metric)
        self.log(f"{prefix}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y),
                 sync_dist=True)
        self.log(f"{prefix}_accuracy", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, None, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, self.val_acc, "val")

    def _extra_val_metrics(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        for name in self.extra_metrics:
            metric = getattr(self, f"val_{name}")
            metric(logits, y)
            self.log(f"val_{name}", metric, on_step=False, on_epoch=True, batch_size=len(y))

    def param_groups(self) -> list[dict]:
        named = dict(self.model.named_parameters())
        head_names = head_parameter_names(self.model, self.classifier)
        groups = [{"params": [named[n] for n in head_names], "lr": self.optimizer_settings.peak_lr, "name": "head"}]
        for i, (names, lr) in enumerate(zip(self.body_groups, self.body_lrs)):
            groups.append({"params": [named[n] for n in names], "lr": lr, "name": f"body{i}"})
        return groups

    def configure_optimizers(self):
        # Every group is in the optimizer from the start; frozen parameters simply get no
        # gradient. The schedule therefore covers all groups and resume sees the same groups.
        opt = make_optimizer(self.param_groups(), self.optimizer_settings)
        full = max(1, stepping_batches(self.trainer))
        total = min(full, self.schedule_settings.max_steps or full)  # --max-steps: the schedule ends there
        sched = make_scheduler(opt, self.schedule_settings, total, self.steps_per_epoch(full))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def set_length(self, total: int, steps_per_epoch: int) -> None:
        """A re-plan (:class:`~visiontune.training.budget.Replan`): this fit now ends after ``total``
        steps of ``steps_per_epoch``, and its LR schedule from the current step on spans that."""
        epochs = math.ceil(total / steps_per_epoch)
        self.schedule_settings = replace(self.schedule_settings, epochs=epochs, max_steps=total)
        scheduler = self.lr_schedulers()
        factor = schedule_fn(self.schedule_settings, total, steps_per_epoch)
        scheduler.lr_lambdas = [factor] * len(scheduler.lr_lambdas)

    def steps_per_epoch(self, total: int) -> int:
        """Optimizer steps per epoch for the schedule's warm-up and step decay, given this fit's ``total``."""
        return max(1, total // max(1, self.schedule_settings.epochs))


def early_view(x: torch.Tensor, side: int) -> torch.Tensor:
    """A batch of images resized so that its height is ``side`` px (the aspect kept), with
    antialiasing: what the first steps of a progressively resized run train on. One step at the
    smaller side costs what its area does (EfficientNet-Lite0 at 64 px: 0.45 of a step at 96).
    The step counter, not the data pipeline, decides, so a resumed run repeats it exactly.

    Example:
        >>> tuple(early_view(torch.zeros(2, 3, 96, 96), 64).shape)
        (2, 3, 64, 64)
        >>> tuple(early_view(torch.zeros(1, 3, 40, 80), 20).shape)  # the aspect kept
        (1, 3, 20, 40)
    """
    height, width = x.shape[-2:]
    size = (side, max(1, round(width * side / height)))
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


class HeadModule(ClassifierModule):
    """The classifier layer alone, trained on cached features of the frozen body.

    The same loss, metrics, logged names and checkpoint contents as :class:`ClassifierModule`, so
    the one Lightning loop (callbacks for the deadline, early stopping, EMA, checkpoints and
    metrics) trains it. Batches are ``(features [B, d], targets)``; there is no image to mix or
    mirror.

    A linear layer's step costs less than logging it, so it logs nothing per step: the epoch's
    training loss and accuracy are :meth:`~ClassifierModule.count`'s sums, as every fit's. Like
    any fit, a run stopped mid-epoch (SIGTERM, or a kill after a ``--checkpoint-every-steps``
    checkpoint) resumes bit-exactly (the loader's position:
    :class:`~visiontune.training.lightning_fit.ResumableLoader`).

    Args:
        head: the model's classifier layer (a submodule of the run's model, trained in place).
        optimizer, schedule, label_smoothing, class_weights, task: as :class:`ClassifierModule`.
    """

    phase = HEAD_PHASE

    def __init__(self, head: nn.Module, optimizer: OptimizerSettings, schedule: ScheduleSettings,
                 label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None,
                 task: str | Task = "single"):
        super().__init__(head, "", [], [], optimizer, schedule, label_smoothing, class_weights, task=task)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = self.loss_fn(logits.float(), y)
        self.count(loss, logits, y)
        return loss

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.model.parameters()), "lr": self.optimizer_settings.peak_lr, "name": "head"}]

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, prefix: str) -> dict[str, float]:
        """What an epoch of the loop logs for features ``x`` and targets ``y`` as ``{prefix}_loss``,
        ``{prefix}_accuracy`` and, for ``val``, each selection metric (``val_<name>``): the scores of
        a head fitted in one step, computed as a trained one's are."""
        logits = self.model(x)
        scores, target = self.task.metric_inputs(logits, y)
        metrics = self.task.metrics(logits.shape[1])
        out = {f"{prefix}_loss": float(self.loss_fn(logits.float(), y)),
               f"{prefix}_accuracy": float(metrics.pop("accuracy")(scores, target))}
        if prefix == "val":
            out.update({f"val_{name}": float(metric(scores, target)) for name, metric in metrics.items()})
        return out

    def steps_per_epoch(self, total: int) -> int:
        # this fit's own epochs (the warm-up's are fewer than the run's): the head's schedule spans them
        return max(1, total // max(1, self.trainer.max_epochs))


def stepping_batches(trainer: L.Trainer) -> int:
    """Optimizer steps of this fit, from the datamodule's sizes.

    Lightning's ``estimated_stepping_batches`` builds the train loader's first iterator to count
    batches, before a resumed run has restored its epoch: that iterator would replay epoch 0's
    order. Counting from the dataset avoids iterating anything.
    """
    data = trainer.datamodule
    if data is not None and hasattr(data, "batches_per_epoch"):  # cached features: passes of known batches
        batches = data.batches_per_epoch()
    elif data is None or not hasattr(data, "train_set"):
        return int(trainer.estimated_stepping_batches)
    else:
        per_rank = math.ceil(len(data.train_set) / max(1, trainer.world_size))
        batches = math.ceil(per_rank / data.batch_size)
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        batches = min(batches, limit)
    elif limit is not None and limit < 1.0:
        batches = max(1, int(batches * limit))
    return math.ceil(batches / trainer.accumulate_grad_batches) * max(1, trainer.max_epochs)
