"""The LightningModule: loss, metrics, discriminative learning rates and the schedule.

It takes the few hyperparameters it uses, not the run's whole config.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassRecall,
    MultilabelAccuracy,
    MultilabelAveragePrecision,
    MultilabelF1Score,
)

from ..inference.runners import forward_logits
from ..models.groups import head_parameter_names
from .checkpoint_io import restore_rng, rng_state
from .objective import loss_function
from .optim import OptimizerSettings, ScheduleSettings, make_optimizer, make_scheduler


class ClassifierModule(L.LightningModule):
    """Trains ``model`` (backbone + classifier) with per-group learning rates.

    Args:
        model: the network; its classification layer is the submodule named ``classifier``.
        classifier: dotted name of the classification layer (it trains at the peak LR).
        body_groups: parameter names of the body from stem to top; each group gets its own LR.
        body_lrs: one LR per body group.
        optimizer: optimizer name, peak LR, weight decay, momentum.
        schedule: LR schedule over the run.
        label_smoothing: of the cross-entropy loss (single-label).
        class_weights: optional per-class loss weights (multi-label: per-label ``pos_weight``).
        freeze_bn_stats: keep every BatchNorm's running statistics (``--bn-stats frozen``).
        compile: train a ``torch.compile`` view of the model.
        mixup: mixup and cutmix alphas (timm's ``Mixup``; both 0: off).
        tta: validate with the flip test-time augmentation every prediction of the model will use.
        multi_label: sigmoid outputs, binary cross-entropy and multi-label metrics (targets ``[B, C]``).
    """

    def __init__(self, model: nn.Module, classifier: str, body_groups: list[list[str]], body_lrs: list[float],
                 optimizer: OptimizerSettings, schedule: ScheduleSettings, label_smoothing: float = 0.0,
                 class_weights: torch.Tensor | None = None, freeze_bn_stats: bool = False, compile: bool = False,
                 mixup: tuple[float, float] = (0.0, 0.0), tta: bool = False, multi_label: bool = False):
        super().__init__()
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
        self.loss_fn = loss_function(multi_label, class_weights, label_smoothing)
        self.multi_label = multi_label
        self.tta = tta
        self.mixup_fn = None
        if any(mixup):  # soft targets: the label smoothing moves into the mixed labels
            from timm.data import Mixup  # lazy: only runs that mix images need it

            # multi-label: the two images' multi-hot targets mixed by the same lambda (no smoothing)
            self.mixup_fn = Mixup(mixup_alpha=mixup[0], cutmix_alpha=mixup[1], num_classes=num_classes,
                                  label_smoothing=0.0 if multi_label else label_smoothing, multi_label=multi_label)
        if multi_label:  # accuracy: label decisions right at p = 0.5; selection by macro mAP by default
            self.train_acc = MultilabelAccuracy(num_labels=num_classes, average="micro")
            self.val_acc = MultilabelAccuracy(num_labels=num_classes, average="micro")
            self.val_macro_f1 = MultilabelF1Score(num_labels=num_classes, average="macro")
            self.val_map = MultilabelAveragePrecision(num_labels=num_classes, average="macro")
            self.extra_metrics = ("macro_f1", "map")
        else:
            self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
            self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
            # model selection metrics (--select-metric); balanced accuracy = macro-averaged recall
            self.val_macro_f1 = MulticlassF1Score(num_classes=num_classes, average="macro")
            self.val_balanced_accuracy = MulticlassRecall(num_classes=num_classes, average="macro")
            self.extra_metrics = ("macro_f1", "balanced_accuracy")

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

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lightning does not store RNG state; without it dropout/drop-path differ after --resume
        checkpoint["visiontune_rng"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_rng(checkpoint.get("visiontune_rng"))

    def _step(self, batch, metric: Metric, prefix: str) -> torch.Tensor:
        x, y = batch
        if x.device.type in ("cpu", "cuda") and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if prefix == "train" and self.mixup_fn is not None and len(y) % 2 == 0:  # timm mixes pairs
            x, soft = self.mixup_fn(x, y)
            logits = self(x)
            loss = (self.loss_fn(logits.float(), soft) if self.multi_label
                    else torch.sum(-soft * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean())
        else:
            logits = forward_logits(self, x, tta=self.tta and prefix == "val")
            loss = self.loss_fn(logits.float(), y)
        # torchmetrics' multi-label metrics take probabilities (raw logits all inside [0, 1] would be
        # read as probabilities) and integer targets
        scores, y_metric = (torch.sigmoid(logits.float()), y.int()) if self.multi_label else (logits, y)
        metric(scores, y_metric)
        if prefix == "val":
            self._extra_val_metrics(scores, y_metric)
        on_step = prefix == "train"
        self.log(f"{prefix}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(y),
                 sync_dist=True)
        self.log(f"{prefix}_accuracy", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, self.train_acc, "train")

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
        total = max(1, stepping_batches(self.trainer))
        steps_per_epoch = max(1, total // max(1, self.schedule_settings.epochs))
        sched = make_scheduler(opt, self.schedule_settings, total, steps_per_epoch)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def stepping_batches(trainer: L.Trainer) -> int:
    """Optimizer steps of this fit, from the datamodule's sizes.

    Lightning's ``estimated_stepping_batches`` builds the train loader's first iterator to count
    batches, before a resumed run has restored its epoch: that iterator would replay epoch 0's
    order. Counting from the dataset avoids iterating anything.
    """
    data = trainer.datamodule
    if data is None or not hasattr(data, "train_set"):
        return int(trainer.estimated_stepping_batches)
    per_rank = math.ceil(len(data.train_set) / max(1, trainer.world_size))
    batches = math.ceil(per_rank / data.batch_size)
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        batches = min(batches, limit)
    elif limit is not None and limit < 1.0:
        batches = max(1, int(batches * limit))
    return math.ceil(batches / trainer.accumulate_grad_batches) * max(1, trainer.max_epochs)
