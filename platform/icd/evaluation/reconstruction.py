"""Reconstruction quality: invert an image and decode it back, compare with the input.

``latent_mse`` compares the reconstructed latent with the encoded input latent; the PSNRs
compare the decoded reconstruction with the input image itself (pixels in [0, 1]), so they
include the VAE's own loss, as the papers' tables do. The reported ``psnr`` is the mean of
per-image PSNRs, the definition of the published iCD evaluation code (its ``calculate_psnr``
scores each image, the table averages); ``psnr_pooled`` is the PSNR of the set's mean squared
error, which a few badly reconstructed images dominate.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from icd.diffusion import samplers
from icd.diffusion.boundaries import Boundaries
from icd.models.bundle import ModelBundle


def latent_mse(reconstructed: torch.Tensor, original: torch.Tensor) -> float:
    """mean((z_rec - z0)^2) over every latent element."""
    return float(((reconstructed.double() - original.double()) ** 2).mean())


# The PSNR of an exact reconstruction, as the editing metrics cap it, so that a mean stays finite.
MAX_PSNR = 100.0


def pooled_psnr(images: torch.Tensor, references: torch.Tensor) -> float:
    """10 log10(1 / MSE) of images in [-1, 1] mapped to [0, 1], clamped; the MSE is over the whole set."""
    a = ((images.double().clamp(-1, 1) + 1) / 2)
    b = ((references.double().clamp(-1, 1) + 1) / 2)
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else float(10.0 * np.log10(1.0 / mse))


def per_image_psnr(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """10 log10(1 / MSE_i) per image, pixels in [-1, 1] mapped to [0, 1] and clamped (inf where equal)."""
    a = (images.double().clamp(-1, 1) + 1) / 2
    b = (references.double().clamp(-1, 1) + 1) / 2
    mse = ((a - b) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse)


def mean_psnr(images: torch.Tensor, references: torch.Tensor) -> float:
    """mean_i min(MAX_PSNR, 10 log10(1 / MSE_i)): the average of per-image PSNRs, as the papers report."""
    return float(per_image_psnr(images, references).clamp(max=MAX_PSNR).mean())


def consistency_reconstructor(boundaries: Boundaries, guidance: float = 0.0, tau: float | None = None,
                              seed: int = 0) -> Callable:
    """Encode with the forward model, decode with the reverse model (guided with w and tau if asked)."""
    def run(bundle: ModelBundle, latents: torch.Tensor, captions: list[str]) -> samplers.SampleOutput:
        generator = torch.Generator().manual_seed(seed)
        if guidance:
            return samplers.edit(bundle, captions, captions, boundaries, latents=latents, guidance=guidance,
                                 tau=tau, generator=generator, decode=False)
        return samplers.reconstruct(bundle, captions, boundaries, latents=latents, generator=generator, decode=False)
    return run


def ddim_reconstructor(num_steps: int) -> Callable:
    """DDIM-N inversion then DDIM-N sampling with the teacher (adapters disabled), unguided."""
    def run(bundle: ModelBundle, latents: torch.Tensor, captions: list[str]) -> samplers.SampleOutput:
        return samplers.ddim_reconstruct(bundle, captions, num_steps, latents=latents, decode=False)
    return run


@torch.no_grad()
def reconstruction_metrics(bundle: ModelBundle, images: torch.Tensor, captions: list[str], reconstructor: Callable,
                           batch_size: int = 64) -> dict[str, float]:
    """{"mse": latent MSE, "psnr": mean per-image PSNR (dB), "psnr_pooled": PSNR of the set's MSE (dB),
    "nfe": UNet passes per image} over ``images`` in [-1, 1]."""
    originals, recon_latents, recon_images, nfe = [], [], [], 0
    for lo in range(0, len(images), batch_size):
        chunk = images[lo:lo + batch_size].to(bundle.device)
        latents = bundle.encode_images(chunk)
        out = reconstructor(bundle, latents, list(captions[lo:lo + batch_size]))
        originals.append(latents.cpu())
        recon_latents.append(out.latents.cpu())
        recon_images.append(bundle.decode_latents(out.latents).cpu())
        nfe = out.nfe
    reconstructed = torch.cat(recon_images)
    return {"mse": latent_mse(torch.cat(recon_latents), torch.cat(originals)),
            "psnr": mean_psnr(reconstructed, images), "psnr_pooled": pooled_psnr(reconstructed, images), "nfe": nfe}


def load_eval_images(uri: str, count: int, resolution: int, settings=None) -> tuple[torch.Tensor, list[str]]:
    """The first ``count`` good images of a shard dataset (local or s3://) in [-1, 1], with their captions."""
    from icd.data.preprocess import SampleFilter, decode_rgb, resize_and_crop, to_chw, to_model_range
    from icd.data.reader import list_files
    from icd.data.shards import iter_tar_samples

    fs, tars = list_files(uri, ".tar", settings)
    images, captions, keep = [], [], SampleFilter(min_side=1)
    for tar in tars:
        with fs.open_input_stream(tar) as f:
            samples = [s for s in iter_tar_samples(f.read()) if s != "truncated"]
        for sample in samples:
            if not sample.caption:
                continue
            image = resize_and_crop(decode_rgb(sample.image, keep), resolution, "center")
            images.append(to_chw(np.asarray(image)))
            captions.append(sample.caption)
            if len(images) == count:
                return to_model_range(torch.from_numpy(np.stack(images))), captions
    if not images:
        raise ValueError(f"no usable images in {uri}")
    return to_model_range(torch.from_numpy(np.stack(images))), captions
