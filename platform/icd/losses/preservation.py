"""Preservation losses (lambda_f = lambda_r = 1.5, unguided) that make the two models inverses.

Lf: a noisy latent x_s at a boundary is decoded one segment by the reverse model (no grad);
the forward model must map the result back to x_s. Lr is the mirror image.
"""

from __future__ import annotations

import torch

from icd.losses.consistency import pseudo_huber


def forward_preservation_loss(forward_of_decoded: torch.Tensor, x_boundary: torch.Tensor,
                              c: float = 0.001) -> torch.Tensor:
    """Lf = d(f_fwd(stopgrad f_rev(x_s)), x_s)."""
    return pseudo_huber(forward_of_decoded, x_boundary.detach(), c)


def reverse_preservation_loss(reverse_of_encoded: torch.Tensor, x_boundary: torch.Tensor,
                              c: float = 0.001) -> torch.Tensor:
    """Lr = d(f_rev(stopgrad f_fwd(x_s)), x_s)."""
    return pseudo_huber(reverse_of_encoded, x_boundary.detach(), c)
