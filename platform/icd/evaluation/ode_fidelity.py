"""How far each consistency jump lands from the teacher ODE it distils, one segment at a time.

Consistency distillation trains f(x_t, t -> s) to agree with the teacher's DDIM ODE from t down
(decoder) or up (encoder) to the segment's boundary s. Reconstruction PSNR mixes both models and
all segments; these errors separate them: a segment whose error grows during training has drifted
away from the ODE (e.g. a bootstrapped target that agrees with itself but not with the teacher),
which the consistency loss alone cannot show.

The reference points are the teacher's own ODE from the image noised to the encoder's first
timestep (19), stepped by ``teacher_step`` (20) up to T - 1 with epsilon at the current point,
unguided, adapters off: exactly the steps the forward consistency loss takes, and the marginal the
decoder trains on. The decoder's last segment lands on the clean latent, so its reference is x0.
"""

from __future__ import annotations

import torch

from icd.diffusion.boundaries import Boundaries
from icd.diffusion.samplers import consistency_decode, consistency_encode
from icd.diffusion.schedule import add_noise, ddim_jump_timesteps
from icd.models.bundle import FORWARD, REVERSE, ModelBundle


def teacher_ode_points(bundle: ModelBundle, x0: torch.Tensor, context: torch.Tensor, boundaries: Boundaries,
                       teacher_step: int = 20, noise: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """{timestep: x_t} at each boundary of the teacher ODE x_19 -> x_39 -> ... -> x_999 (x_19 = noised x0).

    Key 0 is x0 itself. Every boundary below T - 1 must lie on the grid 19 + k * teacher_step (the last
    step is shortened to land on T - 1).
    """
    start, top = boundaries.forward_timesteps[0], boundaries.num_train_timesteps - 1
    wanted = {*boundaries.forward_timesteps, *boundaries.forward_targets, *boundaries.reverse_timesteps,
              *boundaries.reverse_targets} - {0}
    off_grid = sorted(t for t in wanted if t != top and (t - start) % teacher_step)
    if off_grid:
        raise ValueError(f"boundaries {off_grid} are not on the teacher's grid {start} + k * {teacher_step}")
    noise = torch.randn_like(x0) if noise is None else noise
    x = add_noise(bundle.alphas_cumprod, x0, noise, start).to(x0.dtype)
    points = {0: x0, start: x}
    with bundle.adapter(None):
        for t in range(start, top, teacher_step):
            s = min(t + teacher_step, top)
            x = ddim_jump_timesteps(bundle.alphas_cumprod, x, bundle.eps(x, t, context, 0.0), t, s).to(x0.dtype)
            if s in wanted:
                points[s] = x
    return points


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.mean((a.float() - b.float()) ** 2).item()


def jump_error(bundle: ModelBundle, adapter: str, points: dict[int, torch.Tensor], context: torch.Tensor,
               t: int, s: int) -> float:
    """MSE(f_adapter(x_t, t -> s), x_s) over the batch, with both points from `teacher_ode_points` (unguided)."""
    x_t = points[t]
    with bundle.adapter(adapter):
        eps = bundle.eps(x_t, t, context, 0.0)
    return _mse(ddim_jump_timesteps(bundle.alphas_cumprod, x_t, eps, torch.tensor(t), torch.tensor(s)), points[s])


def segment_errors(bundle: ModelBundle, x0: torch.Tensor, context: torch.Tensor, boundaries: Boundaries,
                   teacher_step: int = 20, noise: torch.Tensor | None = None) -> dict:
    """Each model's error against the teacher ODE, per segment and over its whole chain (latent MSE).

    "decoder": per reverse segment, 999 -> 779 first; "encoder": per forward segment, 19 -> 259 first;
    "decoder_chain": all decoder jumps from the ODE's x_999 against x0; "encoder_chain": all encoder
    jumps from the ODE's x_19 against the ODE's x_999.
    """
    noise = torch.randn_like(x0) if noise is None else noise
    with torch.no_grad():
        points = teacher_ode_points(bundle, x0, context, boundaries, teacher_step, noise)
        encoded = consistency_encode(bundle, x0, context, boundaries, noise=noise).latents  # from the same x_19
        decoded = consistency_decode(bundle, points[boundaries.reverse_timesteps[0]], context, boundaries).latents
        return {
            "decoder": [jump_error(bundle, REVERSE, points, context, t, s)
                        for t, s in zip(boundaries.reverse_timesteps, boundaries.reverse_targets)],
            "encoder": [jump_error(bundle, FORWARD, points, context, t, s)
                        for t, s in zip(boundaries.forward_timesteps, boundaries.forward_targets)],
            "decoder_chain": _mse(decoded, x0),
            "encoder_chain": _mse(encoded, points[boundaries.forward_targets[-1]]),
        }
