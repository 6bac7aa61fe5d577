"""Samplers over a `ModelBundle`: consistency generate / invert / reconstruct / edit, and DDIM-N.

Every sampler returns a `SampleOutput` whose ``nfe`` counts UNet evaluations per sample:
one per step for a guidance-embedded UNet (w goes in as ``timestep_cond``), two per guided
step for a plain CFG teacher. The caller's timestep lists are never modified.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from icd.diffusion.boundaries import Boundaries
from icd.diffusion.guidance import cfg_combine, guidance_schedule
from icd.diffusion.schedule import add_noise, alpha_sigma, ddim_jump, target_alpha_sigma
from icd.models.bundle import FORWARD, REVERSE, ModelBundle

Guidance = float | Sequence[float] | torch.Tensor  # a 2-D tensor: (steps, batch)


@dataclass
class SampleOutput:
    latents: torch.Tensor
    nfe: int
    images: torch.Tensor | None = None  # in [-1, 1] when decoded


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)


# --- latent-space cores -----------------------------------------------------------------

def step_plan(bundle: ModelBundle, x: torch.Tensor, timesteps: Sequence[int], targets: Sequence[int],
              ws: Sequence) -> list[tuple]:
    """Per step, on x's device before the loop starts: (t, timestep_cond, DDIM-jump coefficients t -> s).

    The jump coefficients are those of `ddim_jump_timesteps`; nothing is copied from the host inside the loop.
    """
    plan = []
    for t, s, w in zip(timesteps, targets, ws):
        coefficients = (*alpha_sigma(bundle.alphas_cumprod, t), *target_alpha_sigma(bundle.alphas_cumprod, s))
        plan.append((torch.full((x.shape[0],), int(t), device=x.device), bundle.guidance_cond(w, x.shape[0]),
                     tuple(c.to(x.device, x.dtype) for c in coefficients)))
    return plan


def consistency_decode(bundle: ModelBundle, x_t: torch.Tensor, context: torch.Tensor, boundaries: Boundaries,
                       guidance: Guidance = 0.0, tau: float | None = None, adapter: str | None = REVERSE,
                       ) -> SampleOutput:
    """Reverse CD^m: from x at the first reverse timestep, one jump per segment to the clean latent.

    ``guidance`` is w, a per-step list, or a (steps, batch) tensor (`batched_guidance`: w per sample).
    """
    timesteps, targets = boundaries.reverse_timesteps, boundaries.reverse_targets
    if isinstance(guidance, torch.Tensor) and guidance.dim() == 2:
        if guidance.shape != (len(timesteps), x_t.shape[0]):
            raise ValueError(f"guidance tensor {tuple(guidance.shape)}: expected (steps, batch) = "
                             f"({len(timesteps)}, {x_t.shape[0]})")
        ws = list(guidance)
    else:
        ws = guidance_schedule(timesteps, guidance, tau, boundaries.num_train_timesteps)
    x = x_t
    with bundle.adapter(adapter):
        for t, cond, jump in step_plan(bundle, x, timesteps, targets, ws):
            x = ddim_jump(x, bundle.eps(x, t, context, cond=cond), *jump).to(x.dtype)
    return SampleOutput(x, nfe=len(timesteps))


def consistency_encode(bundle: ModelBundle, x0: torch.Tensor, context: torch.Tensor, boundaries: Boundaries,
                       generator: torch.Generator | None = None, adapter: str | None = FORWARD,
                       noise: torch.Tensor | None = None) -> SampleOutput:
    """Forward fCD^m (unguided): noise the clean latent to the first forward timestep (19, or 0), then jump up to 999."""
    timesteps, targets = boundaries.forward_timesteps, boundaries.forward_targets
    noise = _noise_like(x0, generator) if noise is None else noise
    x = add_noise(bundle.alphas_cumprod, x0, noise, timesteps[0]).to(x0.dtype)
    with bundle.adapter(adapter):
        for t, cond, jump in step_plan(bundle, x, timesteps, targets, [0.0] * len(timesteps)):
            x = ddim_jump(x, bundle.eps(x, t, context, cond=cond), *jump).to(x0.dtype)
    return SampleOutput(x, nfe=len(timesteps))


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """SD's DDIM grid ("leading", steps_offset 1), descending: 981, 961, ..., 1 for 50 steps.

    The offset is dropped when it would step past the schedule (N = 1000 gives 999, ..., 0).
    """
    ratio = num_train_timesteps // num_steps
    offset = 1 if (num_steps - 1) * ratio + 1 < num_train_timesteps else 0
    return [i * ratio + offset for i in range(num_steps)][::-1]


def _teacher_eps(bundle: ModelBundle, x, t, context, uncond, w: float) -> tuple[torch.Tensor, int]:
    """The teacher's guided epsilon and how many UNet passes it cost."""
    if bundle.guidance_dim is not None:
        return bundle.eps(x, t, context, w), 1
    if w == 0:
        return bundle.eps(x, t, context), 1
    both = bundle.eps(torch.cat([x, x]), t, torch.cat([context, uncond]))
    eps_c, eps_u = both.chunk(2)
    return cfg_combine(eps_c, eps_u, w), 2


def ddim_sample(bundle: ModelBundle, x_t: torch.Tensor, context: torch.Tensor, num_steps: int,
                guidance: Guidance = 0.0, tau: float | None = None, uncond: torch.Tensor | None = None,
                adapter: str | None = None) -> SampleOutput:
    """DDIM-N generation with the teacher (adapters disabled), as diffusers' DDIMScheduler runs it.

    The last step lands on abar_0 (SD's ``set_alpha_to_one=False``), whose sigma_0 ~ 0.029
    the VAE treats as clean; `ddim_invert_latents` starts from the same level, so the pair
    is symmetric.
    """
    timesteps = ddim_timesteps(num_steps, len(bundle.alphas_cumprod))
    targets = timesteps[1:] + [0]
    ws = guidance_schedule(timesteps, guidance, tau, len(bundle.alphas_cumprod))
    x, nfe = x_t, 0
    with bundle.adapter(adapter):
        for t, s, w in zip(timesteps, targets, ws):
            eps, cost = _teacher_eps(bundle, x, t, context, uncond, w)
            nfe += cost
            x = ddim_jump(x, eps, *alpha_sigma(bundle.alphas_cumprod, t), *alpha_sigma(bundle.alphas_cumprod, s))
            x = x.to(x_t.dtype)
    return SampleOutput(x, nfe)


def ddim_invert_latents(bundle: ModelBundle, x0: torch.Tensor, context: torch.Tensor, num_steps: int,
                        guidance: float = 0.0, uncond: torch.Tensor | None = None,
                        adapter: str | None = None) -> SampleOutput:
    """DDIM-N inversion: the clean latent taken at abar_0, then up the grid; each jump uses epsilon(x, t) at its target t."""
    timesteps = ddim_timesteps(num_steps, len(bundle.alphas_cumprod))[::-1]
    sources = [0] + timesteps[:-1]
    x, nfe = x0, 0
    with bundle.adapter(adapter):
        for src, t in zip(sources, timesteps):
            eps, cost = _teacher_eps(bundle, x, t, context, uncond, guidance)
            nfe += cost
            x = ddim_jump(x, eps, *alpha_sigma(bundle.alphas_cumprod, src), *alpha_sigma(bundle.alphas_cumprod, t))
            x = x.to(x0.dtype)
    return SampleOutput(x, nfe)


# --- image / prompt level -----------------------------------------------------------------

def latents_from(bundle: ModelBundle, images: torch.Tensor | None, latents: torch.Tensor | None) -> torch.Tensor:
    if (images is None) == (latents is None):
        raise ValueError("pass exactly one of images or latents")
    return latents.to(bundle.device, bundle.dtype) if latents is not None else bundle.encode_images(images)


@torch.no_grad()
def generate(bundle: ModelBundle, prompts: list[str], boundaries: Boundaries, guidance: Guidance = 7.0,
             tau: float | None = None, generator: torch.Generator | None = None,
             latents: torch.Tensor | None = None, decode: bool = True) -> SampleOutput:
    """Text to image with the reverse consistency model (one UNet pass per step)."""
    context = bundle.encode_prompts(prompts)
    if latents is None:
        size = bundle.unet.config.sample_size
        latents = torch.randn((len(prompts), bundle.unet.config.in_channels, size, size), generator=generator)
        latents = latents.to(bundle.device, bundle.dtype)
    out = consistency_decode(bundle, latents, context, boundaries, guidance, tau)
    if decode:
        out.images = bundle.decode_latents(out.latents)
    return out


@torch.no_grad()
def invert(bundle: ModelBundle, prompts: list[str], boundaries: Boundaries, images: torch.Tensor | None = None,
           latents: torch.Tensor | None = None, generator: torch.Generator | None = None) -> SampleOutput:
    """Image (or clean latent) to noise latent at 999 with the forward consistency model."""
    x0 = latents_from(bundle, images, latents)
    return consistency_encode(bundle, x0, bundle.encode_prompts(prompts), boundaries, generator)


@torch.no_grad()
def reconstruct(bundle: ModelBundle, prompts: list[str], boundaries: Boundaries, images: torch.Tensor | None = None,
                latents: torch.Tensor | None = None, generator: torch.Generator | None = None,
                decode: bool = True) -> SampleOutput:
    """Invert then decode with the same prompt, unguided."""
    return edit(bundle, prompts, prompts, boundaries, images=images, latents=latents, guidance=0.0,
                generator=generator, decode=decode)


@torch.no_grad()
def edit(bundle: ModelBundle, source_prompts: list[str], target_prompts: list[str], boundaries: Boundaries,
         images: torch.Tensor | None = None, latents: torch.Tensor | None = None, guidance: Guidance = 7.0,
         tau: float | None = 0.8, generator: torch.Generator | None = None, decode: bool = True) -> SampleOutput:
    """Invert with the source prompt (w = 0), decode with the target prompt and dynamic CFG."""
    if len(source_prompts) != len(target_prompts):
        raise ValueError(f"{len(source_prompts)} source prompts but {len(target_prompts)} target prompts")
    x0 = latents_from(bundle, images, latents)
    contexts = bundle.encode_prompts(list(source_prompts) + list(target_prompts))
    source, target = contexts[: len(x0)], contexts[len(x0):]
    inverted = consistency_encode(bundle, x0, source, boundaries, generator)
    decoded = consistency_decode(bundle, inverted.latents, target, boundaries, guidance, tau)
    out = SampleOutput(decoded.latents, inverted.nfe + decoded.nfe)
    if decode:
        out.images = bundle.decode_latents(out.latents)
    return out


@torch.no_grad()
def ddim_reconstruct(bundle: ModelBundle, prompts: list[str], num_steps: int = 50,
                     images: torch.Tensor | None = None, latents: torch.Tensor | None = None,
                     decode: bool = True) -> SampleOutput:
    """The baseline: DDIM-N inversion then DDIM-N generation with the teacher, unguided."""
    x0 = latents_from(bundle, images, latents)
    context = bundle.encode_prompts(prompts)
    inverted = ddim_invert_latents(bundle, x0, context, num_steps)
    decoded = ddim_sample(bundle, inverted.latents, context, num_steps)
    out = SampleOutput(decoded.latents, inverted.nfe + decoded.nfe)
    if decode:
        out.images = bundle.decode_latents(out.latents)
    return out


@torch.no_grad()
def ddim_generate(bundle: ModelBundle, prompts: list[str], num_steps: int = 50, guidance: Guidance = 7.0,
                  tau: float | None = None, generator: torch.Generator | None = None,
                  latents: torch.Tensor | None = None, decode: bool = True) -> SampleOutput:
    """The baseline text-to-image: DDIM-N with the teacher (CFG: two passes per guided step unless embedded)."""
    context = bundle.encode_prompts(prompts)
    uncond = bundle.encode_prompts([""] * len(prompts))
    if latents is None:
        size = bundle.unet.config.sample_size
        latents = torch.randn((len(prompts), bundle.unet.config.in_channels, size, size), generator=generator)
        latents = latents.to(bundle.device, bundle.dtype)
    out = ddim_sample(bundle, latents, context, num_steps, guidance, tau, uncond)
    if decode:
        out.images = bundle.decode_latents(out.latents)
    return out
