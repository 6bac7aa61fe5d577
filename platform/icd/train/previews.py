"""Image grids a stage logs every K steps: generation, and for iCD stages reconstruction and edit.

Rows of the grid: generation from the batch's captions; then (iCD stages) the inputs, their
4-step reconstructions and an edit (shapes-world captions get one word swapped).
"""

from __future__ import annotations

import numpy as np
import torch

from icd.diffusion import samplers
from icd.diffusion.boundaries import Boundaries
from icd.models.bundle import ModelBundle

MAX_COLUMNS = 8


def edited_caption(caption: str, index: int) -> str:
    """The target prompt of a preview edit: a shapes-world caption with its colour swapped."""
    from icd.data.shapes import COLORS, parse_caption

    parsed = parse_caption(caption)
    if parsed is None:
        return caption
    color, shape, background = parsed
    choices = [c for c in COLORS if c not in (color, background)]
    return f"a {choices[index % len(choices)]} {shape} on a {background} background"


def to_uint8_grid(rows: list[torch.Tensor]) -> np.ndarray:
    """Rows of (N, 3, H, W) images in [-1, 1] -> one (rows*H, N*W, 3) uint8 image."""
    stacked = torch.stack([r.float().clamp(-1, 1) for r in rows])  # (R, N, 3, H, W)
    r, n, c, h, w = stacked.shape
    grid = stacked.permute(0, 3, 1, 4, 2).reshape(r * h, n * w, c)
    return ((grid + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


@torch.no_grad()
def preview_grid(stage: str, bundle: ModelBundle, boundaries: Boundaries, latents: torch.Tensor,
                 captions: list[str], guidance: float, tau: float, seed: int = 0,
                 guidance_adapter: str | None = None) -> np.ndarray:
    n = min(len(captions), MAX_COLUMNS)
    latents, captions = latents[:n], list(captions[:n])
    generator = torch.Generator().manual_seed(seed)
    if stage == "cfg_distill":  # the guidance-distilled teacher: DDIM-8 with one pass per step
        context = bundle.encode_prompts(captions)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        out = samplers.ddim_sample(bundle, noise, context, 8, guidance, adapter=guidance_adapter)
        return to_uint8_grid([bundle.decode_latents(latents), bundle.decode_latents(out.latents)])
    generated = samplers.generate(bundle, captions, boundaries, guidance, tau, generator=generator)
    recon = samplers.reconstruct(bundle, captions, boundaries, latents=latents, generator=generator)
    targets = [edited_caption(c, i) for i, c in enumerate(captions)]
    edited = samplers.edit(bundle, captions, targets, boundaries, latents=latents, guidance=guidance, tau=tau,
                           generator=generator)
    return to_uint8_grid([generated.images, bundle.decode_latents(latents), recon.images, edited.images])
