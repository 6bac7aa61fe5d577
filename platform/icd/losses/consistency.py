"""Consistency distillation distance: pseudo-Huber on latents (c = 0.001)."""

from __future__ import annotations

import torch


def pseudo_huber(prediction: torch.Tensor, target: torch.Tensor, c: float = 0.001) -> torch.Tensor:
    """mean(sqrt((prediction - target)^2 + c^2) - c), elementwise over the latent."""
    sq = (prediction.float() - target.float()) ** 2
    # Same value as sqrt(sq + c^2) - c, without its cancellation when |diff| << c in float32.
    return (sq / (torch.sqrt(sq + c * c) + c)).mean()


def consistency_loss(student_at_t: torch.Tensor, target_at_teacher_point: torch.Tensor, c: float = 0.001,
                     scale: torch.Tensor | None = None) -> torch.Tensor:
    """d(f_theta(x_t, t -> s) / scale, stopgrad f(x_t', t' -> s) / scale): both map to the same boundary s.

    ``scale``: per sample (B,), e.g. the jump's gain on epsilon (`jump_eps_gain`); None measures on the latents.
    """
    target = target_at_teacher_point.detach()
    if scale is not None:
        scale = scale.abs().reshape(-1, *([1] * (student_at_t.dim() - 1))).to(student_at_t.dtype)
        student_at_t, target = student_at_t / scale, target / scale
    return pseudo_huber(student_at_t, target, c)
