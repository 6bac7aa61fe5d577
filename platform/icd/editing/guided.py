"""Guide-and-Rescale on the reverse steps of an iCD edit (the Inverse-and-Edit recipe).

The forward pass caches the inversion trajectory. Each reverse step at t then runs three
UNet passes: (source prompt, cached inversion latent at t), (source prompt, current latent),
(target prompt, current latent, guided). Two energies compare them: the feature energy
(squared difference of ``up_blocks[1].resnets[1]`` outputs, target pass vs inversion pass)
and the self-attention energy (squared differences of every self-attention map, current-
source pass vs inversion pass). Their gradient with respect to the current latent is
rescaled (`rescale_guidance`) and added to the target epsilon.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from icd.diffusion.boundaries import Boundaries
from icd.diffusion.guidance import guidance_schedule
from icd.diffusion.samplers import SampleOutput
from icd.diffusion.schedule import add_noise, ddim_jump_timesteps
from icd.editing.attention import attention_control
from icd.models.bundle import FORWARD, REVERSE, ModelBundle


@dataclass(frozen=True)
class GuidedOptions:
    feature_weights: Sequence[float] = (0.5, 0.5, 0.5, 0.5)  # one per reverse step (SD1.5 defaults)
    self_attention_weights: Sequence[float] = (0.0, 20000.0, 20000.0, 20000.0)
    bounds: tuple[float, float] = (0.0, 1.0)  # |g'| within [lo, hi] x |eps_trg - eps_inv|
    feature_layer: str = "up_blocks.1.resnets.1"

    @classmethod
    def from_config(cls, editing) -> "GuidedOptions":
        return cls(tuple(editing.guided_feature_weights), tuple(editing.guided_self_attention_weights),
                   tuple(editing.guided_bounds))

    def check(self, steps: int) -> None:
        for name in ("feature_weights", "self_attention_weights"):
            if len(getattr(self, name)) != steps:
                raise ValueError(f"{name} has {len(getattr(self, name))} values for {steps} reverse steps")
        lo, hi = self.bounds
        if not 0 <= lo <= hi:
            raise ValueError(f"bounds must satisfy 0 <= lo <= hi, got {self.bounds}")


def rescale_guidance(grad: torch.Tensor, delta_eps: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    """g' = g * clamp(|g|, lo |d|, hi |d|) / |g| per sample, d = eps_trg - eps_inv (norms over C, H, W)."""
    dims = tuple(range(1, grad.dim()))
    g_norm = grad.flatten(1).norm(dim=1).clamp(min=1e-12)
    d_norm = delta_eps.flatten(1).norm(dim=1)
    target = torch.minimum(torch.maximum(g_norm, bounds[0] * d_norm), bounds[1] * d_norm)
    return grad * (target / g_norm).reshape(-1, *([1] * len(dims)))


def per_sample_mse(a: torch.Tensor, b: torch.Tensor, batch: int) -> torch.Tensor:
    """mean((a - b)^2) over each sample's own elements: (batch,). Attention maps are (batch * heads, ...), batch-major."""
    return (a - b).pow(2).reshape(batch, -1).mean(dim=1)


class _Recorder:
    """Keeps the self-attention maps of one pass (an attention controller) and a layer's output."""

    def __init__(self):
        self.self_maps: list[torch.Tensor] = []
        self.feature: torch.Tensor | None = None

    def __call__(self, probs, is_cross, layer):
        if not is_cross:
            self.self_maps.append(probs)
        return probs


def _run(bundle, recorder, layer, x, t, context, w):
    handle = layer.register_forward_hook(lambda module, args, output: setattr(recorder, "feature", output))
    try:
        with attention_control(bundle.unet, recorder):
            return bundle.eps(x, t, context, w)
    finally:
        handle.remove()


def guided_edit(bundle: ModelBundle, x0: torch.Tensor, source: torch.Tensor, target: torch.Tensor,
                boundaries: Boundaries, guidance=7.0, tau: float | None = 0.8,
                generator: torch.Generator | None = None, options: GuidedOptions = GuidedOptions()) -> SampleOutput:
    """Invert (caching the trajectory), then decode with Guide-and-Rescale guidance."""
    options.check(len(boundaries.reverse_timesteps))
    missing = set(boundaries.reverse_timesteps) - set(boundaries.forward_targets)
    if missing:
        raise ValueError(f"guided mode needs the inversion to pass every reverse timestep; "
                         f"{sorted(missing)} are not forward boundaries")
    acp = bundle.alphas_cumprod
    trajectory: dict[int, torch.Tensor] = {}
    with torch.no_grad(), bundle.adapter(FORWARD):
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
        x = add_noise(acp, x0, noise, boundaries.forward_timesteps[0]).to(x0.dtype)
        for t, s in zip(boundaries.forward_timesteps, boundaries.forward_targets):
            x = ddim_jump_timesteps(acp, x, bundle.eps(x, t, source, 0.0), t, s).to(x0.dtype)
            trajectory[s] = x
    nfe = len(boundaries.forward_timesteps)

    ws = guidance_schedule(boundaries.reverse_timesteps, guidance, tau, boundaries.num_train_timesteps)
    steps = zip(boundaries.reverse_timesteps, boundaries.reverse_targets, ws,
                options.feature_weights, options.self_attention_weights)
    with bundle.adapter(REVERSE):
        layer = bundle.unet.get_submodule(options.feature_layer)  # of the reverse model (its own UNet when fused)
        for t, s, w, feature_weight, self_weight in steps:
            if feature_weight == 0 and self_weight == 0:
                with torch.no_grad():
                    eps = bundle.eps(x, t, target, w)
                nfe += 1
            else:
                with torch.no_grad():
                    inv = _Recorder()
                    eps_inv = _run(bundle, inv, layer, trajectory[t], t, source, 0.0)
                current = x.detach().requires_grad_(True)
                with torch.enable_grad():
                    cur, trg = _Recorder(), _Recorder()
                    _run(bundle, cur, layer, current, t, source, 0.0)
                    eps_trg = _run(bundle, trg, layer, current, t, target, w)
                    energy = feature_weight * per_sample_mse(trg.feature, inv.feature, len(x))
                    energy = energy + self_weight * sum(per_sample_mse(a, b, len(x))
                                                        for a, b in zip(cur.self_maps, inv.self_maps))
                    # a sum of per-sample energies: each image's gradient is its own, whatever the batch
                    grad, = torch.autograd.grad(energy.sum(), current)
                eps = eps_trg.detach() + rescale_guidance(grad, eps_trg.detach() - eps_inv, options.bounds)
                nfe += 3
            with torch.no_grad():
                x = ddim_jump_timesteps(acp, x.detach(), eps, t, s).to(x0.dtype)
    return SampleOutput(x, nfe)
