"""Knowledge distillation: a trained model (``--teacher``) teaches the one being trained.

The student learns from the labels and from the teacher's softened probabilities (Hinton et al.,
2015): ``loss = (1 - alpha) * task loss + alpha * T^2 * KL(teacher_T || student_T)``, where
``_T`` is a softmax at temperature ``T`` (the ``T^2`` keeps the soft term's gradients on the
scale of the hard one's). The teacher sees each augmented training batch as the student does,
re-sampled to its own input size and normalisation (:class:`Teacher`), so a larger model
trained at 224 px can teach a small one trained at 96. Only its outputs are used: it is loaded
through the checked model loader (``model.json`` + ``model.safetensors``, nothing unpickled),
is never trained, and is not saved with the student.

Example:
    >>> import torch
    >>> student, teacher = torch.tensor([[2.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    >>> float(soft_loss(student, teacher, temperature=2.0)) < 1e-6  # the same beliefs: nothing to learn
    True
"""

from __future__ import annotations

import os

import torch
from torch.nn import functional as F

from ..core.errors import ConfigError
from ..data.preprocess import Preprocessing
from ..models.artifact import load_model


def soft_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch."""
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, 1), F.log_softmax(teacher.float() / t, 1),
                    reduction="batchmean", log_target=True) * t * t


class Teacher:
    """A trained visiontune model answering for batches prepared for the student (not an
    ``nn.Module`` attribute of the student's module: its weights stay out of checkpoints).

    Args:
        path: the teacher's run or model folder.
        student_spec: the student's preprocessing (its batches are normalised with it).
        class_names: the student's classes; the teacher's must be the same, in the same order.
    """

    def __init__(self, path: str | os.PathLike, student_spec: Preprocessing, class_names: list[str]):
        self.model, card = load_model(path)
        if card.task.name != "single":
            raise ConfigError(f"--teacher {path} is a {card.task.title} model; distillation takes a single-label "
                              "teacher")
        if list(card.class_names) != list(class_names):
            raise ConfigError(f"--teacher {path} knows the classes {card.class_names[:8]}, the data has "
                              f"{list(class_names)[:8]}: a teacher must be trained on the same classes (same names)")
        self.spec, self.student_spec = card.preprocessing, student_spec
        self.model.requires_grad_(False)

    def _stats(self, spec: Preprocessing, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(spec.mean, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)
        return mean, std

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for a batch normalised for the student."""
        self.model.to(x.device).eval()  # eval: its BatchNorm statistics are its own, not this data's
        s_mean, s_std = self._stats(self.student_spec, x)
        t_mean, t_std = self._stats(self.spec, x)
        pixels = x * s_std + s_mean
        if pixels.shape[-2:] != (self.spec.height, self.spec.width):
            pixels = F.interpolate(pixels, size=(self.spec.height, self.spec.width), mode="bilinear",
                                   align_corners=False, antialias=pixels.shape[-1] > self.spec.width)
        return self.model(((pixels - t_mean) / t_std).contiguous(memory_format=torch.channels_last))


def distill_loss(hard: torch.Tensor, student: torch.Tensor, teacher_logits: torch.Tensor, alpha: float,
                 temperature: float) -> torch.Tensor:
    """``(1 - alpha) * hard + alpha * soft_loss``: the task's own loss blended with the teacher's."""
    return (1 - alpha) * hard + alpha * soft_loss(student, teacher_logits, temperature)

