"""Classifier-free guidance in one notation, the w-embedding, and dynamic CFG.

``eps_w = eps(c) + w * (eps(c) - eps(empty))``: w = 0 unguided, code w = 7 = classical CFG 8.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of w * 1000 (sin half then cos half), the UNet's ``timestep_cond``."""
    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    args = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def cfg_combine(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, w) -> torch.Tensor:
    """eps_w = eps_c + w * (eps_c - eps_u), with w a scalar or one value per sample."""
    w = torch.as_tensor(w, dtype=eps_cond.dtype, device=eps_cond.device)
    if w.dim():
        w = w.reshape(-1, *([1] * (eps_cond.dim() - 1)))
    return eps_cond + w * (eps_cond - eps_uncond)


def dynamic_guidance(t: int, w: float, tau: float, num_train_timesteps: int = 1000) -> float:
    """w(t) = 0 where t / 1000 > tau, else w (a step function of tau)."""
    return 0.0 if t / num_train_timesteps > tau else float(w)


def guidance_schedule(timesteps: Sequence[int], w: float | Sequence[float], tau: float | None = None,
                      num_train_timesteps: int = 1000) -> list[float]:
    """Per-step guidance: a list (used as is), or w with dynamic CFG at tau (None: w at every step)."""
    if isinstance(w, Sequence) and not isinstance(w, str):
        if len(w) != len(timesteps):
            raise ValueError(f"guidance list has {len(w)} values for {len(timesteps)} steps")
        return [float(v) for v in w]
    if tau is None:
        return [float(w)] * len(timesteps)
    return [dynamic_guidance(int(t), float(w), tau, num_train_timesteps) for t in timesteps]


def batched_guidance(timesteps: Sequence[int], guidances: Sequence, taus: Sequence[float | None],
                     num_train_timesteps: int = 1000) -> torch.Tensor:
    """(steps, batch) guidance: one `guidance_schedule` per sample, so requests with their own w and tau share a batch."""
    if len(guidances) != len(taus):
        raise ValueError(f"{len(guidances)} guidance values but {len(taus)} taus")
    columns = [guidance_schedule(timesteps, w, tau, num_train_timesteps) for w, tau in zip(guidances, taus)]
    return torch.tensor(columns, dtype=torch.float32).T
