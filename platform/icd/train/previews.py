"""Image grids a stage logs every K steps: generation, and for iCD stages reconstruction and edit.

Rows of the grid: generation from the batch's captions; then (iCD stages) the inputs, their
4-step reconstructions and an edit (shapes-world captions get one word swapped). Each row is
labelled, tiles are upscaled (nearest) to at least 128 px, and the prompts are listed below.
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


MIN_TILE = 128  # preview tiles are upscaled (nearest) to at least this many pixels a side
LABEL_WIDTH = 120


def labelled_grid(rows: list[torch.Tensor], labels: list[str], captions: list[str],
                  targets: list[str] | None = None) -> np.ndarray:
    """The grid of ``to_uint8_grid``, upscaled (nearest) so a tile is >= MIN_TILE px, with each row's
    label on the left and, below, each column's prompt (and its edit's target prompt)."""
    from PIL import Image, ImageDraw, ImageFont

    grid = to_uint8_grid(rows)
    side = rows[0].shape[-1]
    scale = max(1, -(-MIN_TILE // side))
    tile = side * scale
    big = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    font = ImageFont.load_default()
    lines = [f"{i + 1}: {c}" + (f"  ->  {targets[i]}" if targets else "") for i, c in enumerate(captions)]
    line_height = 14
    canvas = Image.new("RGB", (LABEL_WIDTH + big.shape[1], big.shape[0] + 8 + line_height * (len(lines) + 1)),
                       (255, 255, 255))
    canvas.paste(Image.fromarray(big), (LABEL_WIDTH, 0))
    draw = ImageDraw.Draw(canvas)
    for r, label in enumerate(labels):
        draw.text((6, r * tile + tile // 2 - 6), label, fill=(0, 0, 0), font=font)
    for c in range(len(captions)):
        draw.text((LABEL_WIDTH + c * tile + 4, big.shape[0] + 2), str(c + 1), fill=(0, 0, 0), font=font)
    for i, line in enumerate(lines):
        draw.text((6, big.shape[0] + 6 + line_height * (i + 1)), line, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


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
        return labelled_grid([bundle.decode_latents(latents), bundle.decode_latents(out.latents)],
                             ["input", f"DDIM-8, w={guidance:g}"], captions)
    generated = samplers.generate(bundle, captions, boundaries, guidance, tau, generator=generator)
    recon = samplers.reconstruct(bundle, captions, boundaries, latents=latents, generator=generator)
    targets = [edited_caption(c, i) for i, c in enumerate(captions)]
    edited = samplers.edit(bundle, captions, targets, boundaries, latents=latents, guidance=guidance, tau=tau,
                           generator=generator)
    return labelled_grid([generated.images, bundle.decode_latents(latents), recon.images, edited.images],
                         ["generation", "input", "reconstruction", f"edit, w={guidance:g}"], captions, targets)
