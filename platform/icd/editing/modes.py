"""Edit one batch of images in a chosen mode: ``switch`` (default), ``p2p`` or ``guided``.

All invert with the source prompt (forward model, w = 0) and decode with the target prompt
and dynamic CFG; ``p2p`` additionally decodes the source prompt alongside and lets the
target rows borrow its attention maps (`icd.editing.p2p`); ``guided`` steers each reverse
step with Guide-and-Rescale energies against the cached inversion (`icd.editing.guided`).
"""

from __future__ import annotations

import torch

from icd.diffusion import samplers
from icd.diffusion.boundaries import Boundaries
from icd.diffusion.guidance import guidance_schedule
from icd.diffusion.samplers import SampleOutput, consistency_encode
from icd.diffusion.schedule import ddim_jump_timesteps
from icd.editing.attention import attention_control
from icd.editing.guided import GuidedOptions, guided_edit
from icd.editing.p2p import P2POptions, PromptToPromptController
from icd.models.bundle import REVERSE, ModelBundle

MODES = ("switch", "p2p", "guided")


def edit(bundle: ModelBundle, source_prompts: list[str], target_prompts: list[str], boundaries: Boundaries,
         mode: str = "switch", images: torch.Tensor | None = None, latents: torch.Tensor | None = None,
         guidance=7.0, tau: float | None = 0.8, generator: torch.Generator | None = None,
         p2p: P2POptions | None = None, guided: GuidedOptions | None = None, decode: bool = True) -> SampleOutput:
    """Edit in ``mode``; every mode returns the target latents (and images) with its NFE."""
    if mode == "switch":
        return samplers.edit(bundle, source_prompts, target_prompts, boundaries, images=images, latents=latents,
                             guidance=guidance, tau=tau, generator=generator, decode=decode)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if len(source_prompts) != len(target_prompts):
        raise ValueError(f"{len(source_prompts)} source prompts but {len(target_prompts)} target prompts")
    with torch.no_grad():
        x0 = samplers.latents_from(bundle, images, latents)
    n = len(x0)
    contexts = bundle.encode_prompts(list(source_prompts) + list(target_prompts))
    if mode == "guided":
        out = guided_edit(bundle, x0, contexts[:n], contexts[n:], boundaries, guidance, tau, generator,
                          guided or GuidedOptions())
        if decode:
            with torch.no_grad():
                out.images = bundle.decode_latents(out.latents)
        return out
    with torch.no_grad():
        inverted = consistency_encode(bundle, x0, contexts[:n], boundaries, generator)

    timesteps, targets = boundaries.reverse_timesteps, boundaries.reverse_targets
    ws = guidance_schedule(timesteps, guidance, tau, boundaries.num_train_timesteps)
    controller = PromptToPromptController.for_prompts(p2p or P2POptions(), len(timesteps), bundle.tokenizer,
                                                      list(source_prompts), list(target_prompts))
    x = torch.cat([inverted.latents, inverted.latents])
    with torch.no_grad(), bundle.adapter(REVERSE), attention_control(bundle.unet, controller):
        for step, (t, s, w) in enumerate(zip(timesteps, targets, ws)):
            controller.step = step
            w_rows = torch.tensor([0.0] * n + [w] * n)  # the source rows reconstruct, unguided
            eps = bundle.eps(x, t, contexts, w_rows)
            x = ddim_jump_timesteps(bundle.alphas_cumprod, x, eps, t, s).to(x.dtype)
    out = SampleOutput(x[n:], nfe=inverted.nfe + len(timesteps))
    if decode:
        with torch.no_grad():
            out.images = bundle.decode_latents(out.latents)
    return out
