"""Consistency distillation distance: pseudo-Huber on latents (c = 0.001)."""

from __future__ import annotations

import torch


def pseudo_huber(prediction: torch.Tensor, target: torch.Tensor, c: float = 0.001) -> torch.Tensor:
    """mean(sqrt((prediction - target)^2 + c^2) - c), elementwise over the latent."""
    sq = (prediction.float() - target.float()) ** 2
    # Same value as sqrt(sq + c^2) - c, without its cancellation when |diff| << c in float32.
    return (sq / (torch.sqrt(sq + c * c) + c)).mean()


def consistency_loss(student_at_t: torch.Tensor, target_at_teacher_point: torch.Tensor, c: float = 0.001) -> torch.Tensor:
    """d(f_theta(x_t, t -> s), stopgrad f(x_t', t' -> s)): both map to the same boundary s."""
    return pseudo_huber(student_at_t, target_at_teacher_point.detach(), c)
