"""Quality of the shipped toy base model on held-out shapes-world images.

    python benchmarks/toy_base_quality.py [--images 512] [--generations 256] [--guidance 7]

- vae_psnr_db: PSNR of VAE reconstructions (encode -> decode) of held-out images (goal >= 26 dB).
- caption_accuracy: fraction of DDIM-50 generations (the teacher, code guidance w, i.e.
  classical CFG w + 1) whose shape-region colour is nearest to the caption's colour
  (goal >= 0.8).
Last line: {"vae_psnr_db": ..., "caption_accuracy": ...}
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from icd.data.shapes import random_sample, sample_specs
from icd.diffusion import samplers
from icd.evaluation.shapes import shape_region_color
from icd.models.loading import load_bundle

HELD_OUT_SEED = 2_000_000_000  # never used by jobs/pretrain_toy_base.py


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def vae_psnr(bundle, n: int, batch: int = 128) -> float:
    errors = []
    for lo in range(0, n, batch):
        samples = [random_sample(HELD_OUT_SEED + i) for i in range(lo, min(lo + batch, n))]
        x = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
        recon = bundle.decode_latents(bundle.encode_images(x)).clamp(-1, 1)
        errors.append((((recon + 1) / 2 - (x + 1) / 2) ** 2).flatten(1).mean(1))
    mse = torch.cat(errors).mean().item()
    return 10 * math.log10(1.0 / mse)


@torch.no_grad()
def caption_accuracy(bundle, n: int, guidance: float, steps: int, batch: int = 64, seed: int = 0) -> float:
    specs = sample_specs(np.random.default_rng(seed), n)
    hits = []
    for lo in range(0, n, batch):
        chunk = specs[lo:lo + batch]
        out = samplers.ddim_generate(bundle, [s.caption for s in chunk], num_steps=steps, guidance=guidance,
                                     generator=torch.Generator().manual_seed(seed + lo))
        hits += [shape_region_color(image, s.background) == s.color for image, s in zip(to_uint8(out.images), chunk)]
    return float(np.mean(hits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy", help="model.base to measure (default: the shipped toy model)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--generations", type=int, default=256)
    parser.add_argument("--guidance", type=float, default=7.0, help="code w (classical CFG w + 1)")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()

    bundle = load_bundle(args.model)
    start = time.time()
    psnr = vae_psnr(bundle, args.images)
    print(f"VAE PSNR on {args.images} held-out images: {psnr:.2f} dB ({time.time() - start:.0f}s)", flush=True)
    start = time.time()
    accuracy = caption_accuracy(bundle, args.generations, args.guidance, args.steps)
    print(f"caption accuracy of {args.generations} DDIM-{args.steps} generations at w={args.guidance:g}: "
          f"{accuracy:.3f} ({time.time() - start:.0f}s)", flush=True)
    print(json.dumps({"vae_psnr_db": round(psnr, 2), "caption_accuracy": round(accuracy, 3)}))


if __name__ == "__main__":
    main()
