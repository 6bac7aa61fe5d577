import numpy as np
import pytest
import torch

from icd.losses import (cfg_distillation_loss, consistency_loss, forward_preservation_loss, pseudo_huber,
                        reverse_preservation_loss)
from icd.losses.cycle import PatchLPIPS, cycle_loss


def test_pseudo_huber_against_numpy_and_its_limits():
    a, b = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    d = (a - b).numpy()
    assert pseudo_huber(a, b, 0.001).item() == pytest.approx(float(np.mean(np.sqrt(d ** 2 + 1e-6) - 1e-3)), rel=1e-5)
    # |d| >> c: ~ |d| - c (L1-like); |d| << c: ~ d^2 / (2c) (L2-like).
    big = torch.full((10,), 2.0)
    assert pseudo_huber(big, torch.zeros(10), 0.001).item() == pytest.approx(2.0 - 0.001, rel=1e-6)
    small = torch.full((10,), 1e-5)
    assert pseudo_huber(small, torch.zeros(10), 0.001).item() == pytest.approx(1e-10 / 2e-3, rel=1e-3)
    assert pseudo_huber(a, a).item() == 0.0


def test_consistency_and_preservation_targets_get_no_gradient():
    student = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randn(2, 4, 8, 8, requires_grad=True)
    for loss_fn in (consistency_loss, forward_preservation_loss, reverse_preservation_loss):
        student.grad = target.grad = None
        loss_fn(student, target).backward()
        assert student.grad is not None and student.grad.abs().sum() > 0
        assert target.grad is None


def test_cfg_distillation_loss_is_mse_to_the_guided_teacher():
    student = torch.randn(3, 4, 8, 8, requires_grad=True)
    cond, uncond = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    w = torch.tensor([0.0, 7.0, 19.0])
    expected = torch.stack([((student[i] - (cond[i] + w[i] * (cond[i] - uncond[i]))) ** 2).mean() for i in range(3)]).mean()
    loss = cfg_distillation_loss(student, cond, uncond, w)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert student.grad is not None


@pytest.fixture(scope="module")
def lpips_grid():
    return PatchLPIPS(pretrained_backbone=False)


def test_patch_grid_equals_lpips_on_each_patch(lpips_grid):
    assert lpips_grid.name == "lpips_randvgg"
    assert lpips_grid.patch_starts(512) == [0, 144, 288]
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(1, 3, 300, 300, generator=g) * 2 - 1, torch.rand(1, 3, 300, 300, generator=g) * 2 - 1
    manual = [lpips_grid.lpips(a[..., y:y + 224, x:x + 224], b[..., y:y + 224, x:x + 224]).item()
              for y in (0, 38, 76) for x in (0, 38, 76)]
    assert lpips_grid(a, b).item() == pytest.approx(float(np.mean(manual)), rel=1e-5)


def test_cycle_loss_is_zero_for_identical_images_and_differentiable(lpips_grid):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(lpips_grid(x, x), torch.zeros(2), atol=1e-6)
    decoded = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    loss = cycle_loss(lpips_grid, decoded, x)
    assert loss.item() > 0
    loss.backward()
    assert decoded.grad is not None and decoded.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="shape mismatch"):
        lpips_grid(x, x[:, :, :16])
