"""Guidance (CFG) distillation: one student pass learns the teacher's guided prediction."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from icd.diffusion.guidance import cfg_combine


def cfg_distillation_loss(student_eps: torch.Tensor, teacher_eps_cond: torch.Tensor,
                          teacher_eps_uncond: torch.Tensor, w) -> torch.Tensor:
    """MSE(student(x_t, t, c, w), eps_c + w (eps_c - eps_u)), the teacher's terms without gradient."""
    target = cfg_combine(teacher_eps_cond.detach(), teacher_eps_uncond.detach(), w)
    return F.mse_loss(student_eps.float(), target.float())
