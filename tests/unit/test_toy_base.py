"""The shipped toy base model: loadable offline, SD-shaped, and actually trained."""

import math

import numpy as np
import torch

from icd.data.shapes import random_sample, sample_specs
from icd.diffusion import samplers
from icd.evaluation.shapes import shape_region_color
from icd.models.loading import load_bundle
from icd.models.toy import TOY_BASE_DIR


def test_fixture_is_small_safetensors_in_diffusers_layout():
    files = [p for p in TOY_BASE_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20 * 1024 * 1024
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt")]
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    assert all(p.suffix == ".safetensors" for p in weights)


def test_toy_bundle_shapes_and_vae_quality():
    bundle = load_bundle("toy")
    assert bundle.unet.config.sample_size == 8 and bundle.unet.config.cross_attention_dim == 64
    assert bundle.guidance_dim is None and bundle.unet.dtype == torch.float32
    images = torch.stack([torch.from_numpy(random_sample(3_000_000_000 + i).image).permute(2, 0, 1) for i in range(64)])
    x = images.float() / 127.5 - 1
    with torch.no_grad():
        latents = bundle.encode_images(x)
        recon = bundle.decode_latents(latents).clamp(-1, 1)
    assert latents.shape == (64, 4, 8, 8)
    assert 0.5 < latents.std().item() < 2.0  # the scaling factor makes latents roughly unit-variance
    psnr = 10 * math.log10(1 / (((recon - x) / 2) ** 2).mean().item())
    assert psnr > 24.0


def test_toy_teacher_follows_the_caption_colour():
    bundle = load_bundle("toy")
    specs = sample_specs(np.random.default_rng(0), 32)
    out = samplers.ddim_generate(bundle, [s.caption for s in specs], num_steps=20, guidance=7.0, generator=torch.Generator().manual_seed(0))
    assert out.nfe == 40  # a plain CFG teacher: two passes per guided step
    images = ((out.images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    accuracy = np.mean([shape_region_color(im, s.background) == s.color for im, s in zip(images, specs)])
    assert accuracy >= 0.5  # chance is 1/7
