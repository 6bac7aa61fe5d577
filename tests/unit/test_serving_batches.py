"""The batched calls Serve makes: a request's result does not depend on the batch it shares
(its own w, tau and seed), and the pipeline runs in half precision as on a GPU replica."""

import pytest
import torch
from PIL import Image

from icd.config import load_config
from icd.diffusion.boundaries import Boundaries
from icd.editing.pipeline import EditPipeline, decode_batch, inference_placement, invert_batch
from icd.models.adapters import add_adapters
from icd.models.toy import tiny_bundle

PROMPTS = ["a red circle on a blue background", "a green star on a white background",
           "a black square on a yellow background"]


def pipeline() -> EditPipeline:
    bundle = tiny_bundle(seed=3, guidance_dim=16)
    # random B over PEFT's gaussian A: the fixture's model (its scale sets how far bf16 drifts from fp32)
    add_adapters(bundle.unet, 4, 4, ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj"],
                 init="gaussian")
    with torch.no_grad():
        for name, p in bundle.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    config = load_config("jobs/configs/toy.yaml")
    return EditPipeline(bundle, Boundaries((999, 759, 499, 259), (19, 259, 499, 759)), config.editing, 32)


def pictures(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (24 + 8 * i, 32), (200 - 60 * i, 40 + 50 * i, 90)) for i in range(n)]


@pytest.fixture(scope="module")
def fp32():
    return pipeline()


def test_each_sample_of_a_batch_equals_its_request_alone(fp32):
    images, seeds = pictures(3), [7, 0, 123]
    guidances, taus = [0.0, 7.0, 15.0], [None, 0.8, 0.5]
    together = invert_batch(fp32, images, PROMPTS, seeds).latents
    decoded = decode_batch(fp32, together, PROMPTS, guidances, taus).images
    for i in range(3):
        alone = invert_batch(fp32, [images[i]], [PROMPTS[i]], [seeds[i]]).latents
        # Batched and single convolutions sum in another order (~1e-4 apart); a mixed-up seed, w or
        # tau moves a sample by O(1).
        torch.testing.assert_close(together[i:i + 1], alone, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(decoded[i:i + 1], decode_batch(fp32, alone, [PROMPTS[i]], [guidances[i]],
                                                                   [taus[i]]).images, atol=1e-3, rtol=1e-3)


def test_per_sample_guidance_and_seed_change_only_their_sample(fp32):
    images = pictures(2)
    latents = invert_batch(fp32, images, PROMPTS[:2], [0, 0]).latents
    base = decode_batch(fp32, latents, PROMPTS[:2], [7.0, 7.0], [0.8, 0.8]).images
    other = decode_batch(fp32, latents, PROMPTS[:2], [7.0, 19.0], [0.8, 0.8]).images
    torch.testing.assert_close(other[0], base[0], atol=1e-3, rtol=1e-3)
    assert (other[1] - base[1]).abs().max() > 1e-3
    reseeded = invert_batch(fp32, images, PROMPTS[:2], [0, 1]).latents
    torch.testing.assert_close(reseeded[0], latents[0], atol=1e-3, rtol=1e-3)
    assert (reseeded[1] - latents[1]).abs().max() > 1e-3


def test_the_pipeline_edits_in_bfloat16_as_on_a_gpu_replica(fp32):
    half = tiny_bundle(seed=3, guidance_dim=16)
    add_adapters(half.unet, 4, 4, ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj"])
    half.unet.load_state_dict(fp32.bundle.unet.state_dict())
    half.unet.to(torch.bfloat16)
    half.vae.to(torch.bfloat16)
    half.text_encoder.to(torch.bfloat16)
    assert half.dtype == torch.bfloat16
    bf16 = EditPipeline(half, fp32.boundaries, fp32.editing, 32)
    images = pictures(2)
    out = bf16.edit(images, PROMPTS[:2], PROMPTS[1:3], guidance=7.0, seed=1)
    ref = fp32.edit(images, PROMPTS[:2], PROMPTS[1:3], guidance=7.0, seed=1)
    assert out.nfe == ref.nfe == 8 and [p.size for p in out.images] == [im.size for im in images]
    import numpy as np

    for got, want in zip(out.images, ref.images):  # half precision: close to fp32, not equal
        difference = np.abs(np.asarray(got, dtype=np.float32) - np.asarray(want, dtype=np.float32)).mean()
        assert difference < 12, difference


def test_inference_placement(monkeypatch):
    assert inference_placement("bf16") == ("cpu", torch.float32)  # no GPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert inference_placement("bf16") == ("cuda", torch.bfloat16)
    assert inference_placement("fp16") == ("cuda", torch.float16)
    assert inference_placement("no") == ("cuda", torch.float32)
