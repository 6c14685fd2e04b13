"""Recovery after pruning: BatchNorm re-estimation, least-squares reconstruction, distillation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from visiontune.export.recovery import distill_loss, recalibrate_batchnorm, reconstruct
from visiontune.task import get_task


def test_batchnorm_recalibration_fits_the_data():
    """After pruning, BN statistics are re-estimated (cumulative average) on training images."""
    torch.manual_seed(0)
    conv, norm = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
    model = torch.nn.Sequential(conv, norm)
    batches = [(torch.randn(8, 3, 10, 10) * 3 + 2, torch.zeros(8, dtype=torch.long)) for _ in range(4)]
    recalibrate_batchnorm(model, batches)
    with torch.no_grad():
        outputs = conv(torch.cat([b for b, _ in batches]))
    torch.testing.assert_close(norm.running_mean, outputs.mean((0, 2, 3)), rtol=1e-4, atol=1e-4)
    assert norm.momentum == 0.1 and not model.training


def test_distill_loss_is_half_label_half_teacher():
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    ce = torch.nn.functional.cross_entropy(logits, labels)
    # agreeing with the teacher costs nothing
    single = get_task("single")
    torch.testing.assert_close(distill_loss(logits, labels, logits, single), 0.5 * ce)
    assert distill_loss(logits, labels, -logits, single) > 0.5 * ce


def _block(hidden: int, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(),
                         nn.Conv2d(hidden, 4, 1, bias=bias), nn.BatchNorm2d(4))


def _cut(teacher: nn.Sequential, keep: list[int]) -> nn.Sequential:
    """The teacher with only ``keep`` hidden channels (what structured pruning leaves)."""
    student = _block(len(keep), bias=teacher[3].bias is not None)
    state = teacher.state_dict()
    for key, tensor in state.items():
        if key.startswith(("0.", "1.")) and tensor.ndim:
            state[key] = tensor[keep]
    state["3.weight"] = state["3.weight"][:, keep]
    student.load_state_dict(state)
    return student.eval()


@pytest.mark.parametrize("bias", [False, True])
@torch.no_grad()
def test_reconstruction_recovers_a_removed_duplicate_channel_exactly(bias):
    """A removed channel that copies a kept one is absorbed by the next 1x1 conv without error;
    the BN after the refit conv is the teacher's again."""
    torch.manual_seed(0)
    teacher = _block(6, bias)
    teacher[0].weight[5], teacher[0].bias[5] = teacher[0].weight[0], teacher[0].bias[0]  # channel 5 == channel 0
    teacher[4].running_mean.uniform_(-1, 1)
    teacher.eval()
    student = _cut(teacher, [0, 1, 2, 3, 4])
    student[4].running_mean.zero_()  # as left by re-estimation on the cut network
    batches = [(torch.randn(8, 3, 6, 6), torch.zeros(8, dtype=torch.long)) for _ in range(3)]
    images = torch.cat([b for b, _ in batches])
    assert (student(images) - teacher(images)).abs().max() > 0.1
    assert reconstruct(student, teacher, batches, ridge=1e-9) == ["3"]
    torch.testing.assert_close(student(images), teacher(images), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(student[3].weight[:, 0], teacher[3].weight[:, 0] + teacher[3].weight[:, 5])
    torch.testing.assert_close(student[4].running_mean, teacher[4].running_mean)


@torch.no_grad()
def test_reconstruction_lowers_the_error_and_ridge_pulls_to_the_cut_weights():
    torch.manual_seed(0)
    teacher = _block(8).eval()
    student = _cut(teacher, [0, 2, 4, 6])
    batches = [(torch.randn(8, 3, 6, 6), torch.zeros(8, dtype=torch.long)) for _ in range(3)]
    images = torch.cat([b for b, _ in batches])

    def error(model: nn.Module) -> float:
        return (model[:4](images) - teacher[:4](images)).pow(2).mean().item()

    fitted, stiff = copy.deepcopy(student), copy.deepcopy(student)
    reconstruct(fitted, teacher, batches, ridge=1e-6)
    reconstruct(stiff, teacher, batches, ridge=1e6)
    # the refit layer is the least-squares optimum (checked against an independent solver)
    hidden = student[:3](images).permute(0, 2, 3, 1).reshape(-1, 4)
    target = teacher[:4](images).permute(0, 2, 3, 1).reshape(-1, 4)
    best = torch.linalg.lstsq(hidden.double(), target.double()).solution
    optimum = (hidden.double() @ best - target.double()).pow(2).mean().item()
    assert error(fitted) < error(student)
    assert abs(error(fitted) - optimum) < 1e-5 * error(student)
    torch.testing.assert_close(stiff[3].weight, student[3].weight, rtol=1e-4, atol=1e-5)
    # untouched: layers whose inputs were not cut
    torch.testing.assert_close(fitted[0].weight, student[0].weight)



class _NormRegisteredFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.conv, self.other = nn.BatchNorm2d(4), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.norm(self.conv(self.other(x)))


def test_the_norm_after_a_conv_is_found_by_running_the_model_not_by_module_order():
    from visiontune.export.recovery import _norms_after_convs

    assert _norms_after_convs(_NormRegisteredFirst(), torch.randn(2, 3, 4, 4)) == {"conv": "norm"}
