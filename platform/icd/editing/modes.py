"""Edit one batch of images in a chosen mode: ``switch`` (default) or ``p2p``.

Both invert with the source prompt (forward model, w = 0) and decode with the target prompt
and dynamic CFG; ``p2p`` additionally decodes the source prompt alongside and lets the
target rows borrow its attention maps (see `icd.editing.p2p`).
"""

from __future__ import annotations

import torch

from icd.diffusion import samplers
from icd.diffusion.boundaries import Boundaries
from icd.diffusion.guidance import guidance_schedule
from icd.diffusion.samplers import SampleOutput, consistency_encode
from icd.diffusion.schedule import ddim_jump_timesteps
from icd.editing.attention import attention_control
from icd.editing.p2p import P2POptions, PromptToPromptController
from icd.models.bundle import REVERSE, ModelBundle

MODES = ("switch", "p2p")


@torch.no_grad()
def edit(bundle: ModelBundle, source_prompts: list[str], target_prompts: list[str], boundaries: Boundaries,
         mode: str = "switch", images: torch.Tensor | None = None, latents: torch.Tensor | None = None,
         guidance=7.0, tau: float | None = 0.8, generator: torch.Generator | None = None,
         p2p: P2POptions | None = None, decode: bool = True) -> SampleOutput:
    if mode == "switch":
        return samplers.edit(bundle, source_prompts, target_prompts, boundaries, images=images, latents=latents,
                             guidance=guidance, tau=tau, generator=generator, decode=decode)
    if mode != "p2p":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if len(source_prompts) != len(target_prompts):
        raise ValueError(f"{len(source_prompts)} source prompts but {len(target_prompts)} target prompts")
    x0 = samplers._latents_from(bundle, images, latents)
    n = len(x0)
    contexts = bundle.encode_prompts(list(source_prompts) + list(target_prompts))
    inverted = consistency_encode(bundle, x0, contexts[:n], boundaries, generator)

    timesteps, targets = boundaries.reverse_timesteps, boundaries.reverse_targets
    ws = guidance_schedule(timesteps, guidance, tau, boundaries.num_train_timesteps)
    controller = PromptToPromptController.for_prompts(p2p or P2POptions(), len(timesteps), bundle.tokenizer,
                                                      list(source_prompts), list(target_prompts))
    x = torch.cat([inverted.latents, inverted.latents])
    with bundle.adapter(REVERSE), attention_control(bundle.unet, controller):
        for step, (t, s, w) in enumerate(zip(timesteps, targets, ws)):
            controller.step = step
            w_rows = torch.tensor([0.0] * n + [w] * n)  # the source rows reconstruct, unguided
            eps = bundle.eps(x, t, contexts, w_rows)
            x = ddim_jump_timesteps(bundle.alphas_cumprod, x, eps, t, s).to(x.dtype)
    out = SampleOutput(x[n:], nfe=inverted.nfe + len(timesteps))
    if decode:
        out.images = bundle.decode_latents(out.latents)
    return out
