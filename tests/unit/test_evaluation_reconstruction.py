"""Reconstruction metrics against independent computations."""

import math

import numpy as np
import pytest
import torch

from icd.diffusion.samplers import SampleOutput
from icd.evaluation.reconstruction import (MAX_PSNR, latent_mse, mean_psnr, per_image_psnr, pooled_psnr,
                                           reconstruction_metrics)
from icd.models.toy import tiny_bundle


def test_pooled_psnr_of_a_known_error():
    a = torch.zeros(2, 3, 8, 8)  # 0.5 in [0, 1]
    b = torch.full((2, 3, 8, 8), 0.2)  # 0.6 in [0, 1]: MSE 0.01 -> 20 dB
    assert pooled_psnr(a, b) == pytest.approx(20.0, abs=1e-5)
    assert pooled_psnr(a, a) == math.inf
    assert pooled_psnr(torch.full((1, 3, 2, 2), 3.0), torch.ones(1, 3, 2, 2)) == math.inf  # clamped to [-1, 1]


def test_mean_psnr_averages_images_and_is_not_dominated_by_one_bad_image():
    references = torch.zeros(4, 3, 8, 8)  # 0.5 in [0, 1]
    images = references.clone()
    images[0] += 0.02  # 0.01 in [0, 1]: MSE 1e-4 -> 40 dB
    images[1] += 0.02
    images[2] += 0.2   # 0.1: MSE 1e-2 -> 20 dB
    # images[3] is exact: capped at MAX_PSNR so that the mean stays finite
    assert mean_psnr(images, references) == pytest.approx((40 + 40 + 20 + MAX_PSNR) / 4, abs=1e-6)
    # The set's MSE is (1e-4 + 1e-4 + 1e-2 + 0) / 4: the 20 dB image decides the pooled figure.
    assert pooled_psnr(images, references) == pytest.approx(10 * math.log10(4 / (2e-4 + 1e-2)), abs=1e-6)


def test_latent_mse_is_the_mean_square():
    x, y = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    assert latent_mse(x, y) == pytest.approx(float(np.mean((x.numpy() - y.numpy()) ** 2)), rel=1e-6)


def test_a_perfect_latent_reconstruction_scores_the_vae_round_trip():
    bundle = tiny_bundle(seed=1)
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    identity = lambda b, latents, captions: SampleOutput(latents.clone(), nfe=0)  # noqa: E731
    metrics = reconstruction_metrics(bundle, images, ["a"] * 5, identity, batch_size=2)
    with torch.no_grad():
        round_trip = bundle.decode_latents(bundle.encode_images(images))
    squared = (((round_trip.clamp(-1, 1) + 1) / 2 - (images + 1) / 2) ** 2).double()
    per_image = [10 * np.log10(1 / float(image.mean())) for image in squared]
    assert metrics["mse"] == 0.0 and metrics["psnr"] == pytest.approx(np.mean(per_image), rel=1e-5)
    assert metrics["psnr_pooled"] == pytest.approx(10 * np.log10(1 / float(squared.mean())), rel=1e-5)


def test_per_image_psnr_against_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(-1, 1, (3, 3, 4, 4)), rng.uniform(-1, 1, (3, 3, 4, 4))
    b[2] = a[2]
    expected = [10 * np.log10(1 / np.mean(((x + 1) / 2 - (y + 1) / 2) ** 2)) for x, y in zip(a[:2], b[:2])]
    got = per_image_psnr(torch.from_numpy(a), torch.from_numpy(b))
    assert got[:2].numpy() == pytest.approx(expected, rel=1e-9) and math.isinf(got[2])
