"""The LightningModule: loss, metrics, discriminative learning rates and schedules."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassRecall

from ..config import TrainConfig
from ..models.groups import head_parameter_names
from .checkpoint_io import restore_rng, rng_state

MIN_LR_FACTOR = 0.01  # cosine ends at 1% of the peak, so the last epoch still learns
DEFAULT_LR = {"adamw": 1e-3, "adam": 1e-3, "sgd": 1e-2}


def resolve_lr(cfg: TrainConfig) -> float:
    return float(cfg.lr) if cfg.lr is not None else DEFAULT_LR[cfg.optimizer]


class ClassifierModule(L.LightningModule):
    """Trains ``model`` (backbone + head) with per-group learning rates.

    Args:
        model: the network; its classifier is the submodule named ``head``.
        head: dotted name of the classifier module.
        cfg: the run's configuration.
        body_groups: parameter names of the body from stem to top; each group gets its own LR.
        body_lrs: one LR per body group (the head gets ``resolve_lr(cfg)``).
        class_weights: optional per-class loss weights.
    """

    def __init__(
        self,
        model: nn.Module,
        head: str,
        cfg: TrainConfig,
        body_groups: list[list[str]],
        body_lrs: list[float],
        class_weights: torch.Tensor | None = None,
    ):
        super().__init__()
        self.model = model
        self.head = head
        self.cfg = cfg
        self.body_groups = body_groups
        self.body_lrs = body_lrs
        self.freeze_bn_stats = cfg.bn_stats == "frozen"
        # torch.compile'd view of the same module: parameters and state_dict stay model's own
        self.forward_fn = torch.compile(model) if cfg.compile else model
        num_classes = model.get_submodule(head).out_features
        self.loss_fn = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=cfg.label_smoothing)
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        # model selection metrics (--select-metric); balanced accuracy = macro-averaged recall
        self.val_macro_f1 = MulticlassF1Score(num_classes=num_classes, average="macro")
        self.val_balanced_accuracy = MulticlassRecall(num_classes=num_classes, average="macro")

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

    def _step(self, batch, metric: MulticlassAccuracy, prefix: str) -> torch.Tensor:
        x, y = batch
        if x.device.type in ("cpu", "cuda") and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self(x)
        loss = self.loss_fn(logits.float(), y)
        metric(logits, y)
        if prefix == "val":
            self._extra_val_metrics(logits, y)
        on_step = prefix == "train"
        self.log(f"{prefix}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        self.log(f"{prefix}_accuracy", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, self.train_acc, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, self.val_acc, "val")

    def _extra_val_metrics(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        for name in ("macro_f1", "balanced_accuracy"):
            metric = getattr(self, f"val_{name}")
            metric(logits, y)
            self.log(f"val_{name}", metric, on_step=False, on_epoch=True, batch_size=len(y))

    def param_groups(self) -> list[dict]:
        named = dict(self.model.named_parameters())
        head_names = head_parameter_names(self.model, self.head)
        groups = [{"params": [named[n] for n in head_names], "lr": resolve_lr(self.cfg), "name": "head"}]
        for i, (names, lr) in enumerate(zip(self.body_groups, self.body_lrs)):
            groups.append({"params": [named[n] for n in names], "lr": lr, "name": f"body{i}"})
        return groups

    def configure_optimizers(self):
        # Every group is in the optimizer from the start; frozen parameters simply get no
        # gradient. The schedule therefore covers all groups and resume sees the same groups.
        cfg = self.cfg
        groups = self.param_groups()
        if cfg.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=resolve_lr(cfg), momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
        elif cfg.optimizer == "adam":
            opt = torch.optim.Adam(groups, lr=resolve_lr(cfg), weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.AdamW(groups, lr=resolve_lr(cfg), weight_decay=cfg.weight_decay)
        total = max(1, stepping_batches(self.trainer))
        steps_per_epoch = max(1, total // max(1, cfg.epochs))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=schedule_fn(cfg, total, steps_per_epoch))
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


def schedule_fn(cfg: TrainConfig, total_steps: int, steps_per_epoch: int):
    """LR multiplier per optimizer step: linear warm-up, then cosine, step (x0.1) or constant."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return MIN_LR_FACTOR + (1 - MIN_LR_FACTOR) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if cfg.schedule == "step":
            return 0.1 ** ((step // steps_per_epoch) // max(1, cfg.step_size))
        return 1.0

    return factor
