"""The noise schedule and the DDIM jump between any two timesteps, in either direction.

``x_t = alpha_t * x_0 + sigma_t * eps`` with ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)``.
"""

from __future__ import annotations

import torch

# Timestep -1 is the clean sample (alpha = 1, sigma = 0). As a jump *target* boundary 0
# means the clean sample too (DESIGN.md), while a *source* at t = 0 is noisy (sigma_0 ~ 0.029).
CLEAN = -1


def scaled_linear_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012,
                                 num_train_timesteps: int = 1000) -> torch.Tensor:
    """abar_t = prod_{i<=t} (1 - beta_i), betas linear in sqrt space (SD's "scaled_linear"), float64."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def alpha_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t)); t = -1 (CLEAN) gives (1, 0)."""
    t = torch.as_tensor(t, device=alphas_cumprod.device).long()
    abar = torch.where(t <= CLEAN, torch.ones((), dtype=alphas_cumprod.dtype, device=t.device),
                       alphas_cumprod[t.clamp(min=0)])
    return abar.sqrt(), (1.0 - abar).sqrt()


def target_alpha_sigma(alphas_cumprod: torch.Tensor, s: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_s, sigma_s) of a jump *target*: as `alpha_sigma`, but boundary s = 0 is the clean (1, 0)."""
    s = torch.as_tensor(s, device=alphas_cumprod.device).long()
    return alpha_sigma(alphas_cumprod, torch.where(s <= 0, torch.full_like(s, CLEAN), s))


def _per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or per-sample (B,) coefficient over a (B, C, H, W) tensor, in its dtype."""
    value = torch.as_tensor(value, device=like.device)
    return value.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype) if value.dim() else value.to(like.dtype)


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_t, sigma_t) -> torch.Tensor:
    """x0_hat = (x_t - sigma_t * eps) / alpha_t."""
    return (x_t - _per_sample(sigma_t, x_t) * eps) / _per_sample(alpha_t, x_t)


def ddim_jump(x_t: torch.Tensor, eps: torch.Tensor, alpha_t, sigma_t, alpha_s, sigma_s) -> torch.Tensor:
    """x_s = alpha_s * x0_hat + sigma_s * eps, with x0_hat = (x_t - sigma_t * eps) / alpha_t (either direction)."""
    x0 = predict_x0(x_t, eps, alpha_t, sigma_t)
    return _per_sample(alpha_s, x_t) * x0 + _per_sample(sigma_s, x_t) * eps


def ddim_jump_timesteps(alphas_cumprod: torch.Tensor, x_t: torch.Tensor, eps: torch.Tensor, t, s) -> torch.Tensor:
    """The DDIM jump from timestep t to timestep s (s == 0: the clean sample)."""
    return ddim_jump(x_t, eps, *alpha_sigma(alphas_cumprod, t), *target_alpha_sigma(alphas_cumprod, s))


def jump_eps_gain(alphas_cumprod: torch.Tensor, t, s) -> torch.Tensor:
    """d x_s / d eps of the DDIM jump t -> s at fixed x_t: sigma_s - alpha_s sigma_t / alpha_t (s == 0: clean)."""
    alpha_t, sigma_t = alpha_sigma(alphas_cumprod, t)
    alpha_s, sigma_s = target_alpha_sigma(alphas_cumprod, s)
    return sigma_s - alpha_s * sigma_t / alpha_t


def add_noise(alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
    """x_t = alpha_t * x0 + sigma_t * noise (t == 0 still adds sigma_0 ~ 0.029, as SD's add_noise)."""
    alpha, sigma = alpha_sigma(alphas_cumprod, t)
    return _per_sample(alpha, x0) * x0 + _per_sample(sigma, x0) * noise
