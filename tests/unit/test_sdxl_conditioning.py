"""SDXL's conditioning through the bundle equals what diffusers' SDXL pipeline computes.

The reference is ``StableDiffusionXLPipeline`` built from the same tiny SDXL-architecture
components (`icd.models.toy.tiny_sdxl_bundle`): its ``encode_prompt`` (both encoders'
penultimate hidden states, the second's pooled projection, zeros for the empty negative prompt)
and ``_get_add_time_ids``, then its UNet call with ``added_cond_kwargs``.
"""

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from icd.models import conditioning
from icd.models.toy import sd_scheduler, tiny_sdxl_bundle

PROMPTS = ["a red circle on a blue background", "a green star on a white background"]


@pytest.fixture(scope="module")
def bundle():
    return tiny_sdxl_bundle(seed=4)


@pytest.fixture(scope="module")
def pipeline(bundle):
    return StableDiffusionXLPipeline(vae=bundle.vae, text_encoder=bundle.text_encoder,
                                     text_encoder_2=bundle.text_encoder_2, tokenizer=bundle.tokenizer,
                                     tokenizer_2=bundle.tokenizer_2, unet=bundle.unet, scheduler=sd_scheduler(),
                                     force_zeros_for_empty_prompt=True)


def test_pack_and_unpack_are_inverse_and_refuse_what_does_not_fit():
    g = torch.Generator().manual_seed(0)
    hidden, pooled = torch.randn(3, 77, 64, generator=g), torch.randn(3, 32, generator=g)
    ids = conditioning.size_time_ids((512, 768), (16, 0), (1024, 1024))
    assert ids.tolist() == [512, 768, 16, 0, 1024, 1024]
    context = conditioning.pack(hidden, pooled, ids)
    assert context.shape == (3, 78, 64) and torch.count_nonzero(context[:, -1, 38:]) == 0
    h, p, t = conditioning.unpack(context, 32)
    assert torch.equal(h, hidden) and torch.equal(p, pooled) and torch.equal(t, ids.expand(3, 6))
    other = conditioning.size_time_ids((1024, 1024), (0, 0), (1024, 1024))
    moved = conditioning.with_time_ids(context, other, 32)
    assert torch.equal(conditioning.time_ids_of(moved, 32), other.expand(3, 6))
    assert torch.equal(moved[:, :-1], hidden) and torch.equal(conditioning.unpack(moved, 32)[1], pooled)
    with pytest.raises(conditioning.ConditioningError, match="does not fit a context token of width 64"):
        conditioning.pack(hidden, torch.zeros(3, 60), ids)


def test_prompt_embeddings_equal_the_sdxl_pipeline(bundle, pipeline):
    context = bundle.encode_prompts(PROMPTS + [""] * 2)
    cond, neg, pooled, neg_pooled = pipeline.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                           do_classifier_free_guidance=True)
    hidden, ours_pooled, time_ids = conditioning.unpack(context, bundle.pooled_dim)
    assert cond.shape == (2, 77, 64) and torch.count_nonzero(cond) > 0
    torch.testing.assert_close(hidden[:2], cond, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_pooled[:2], pooled, atol=1e-6, rtol=0)
    torch.testing.assert_close(hidden[2:], neg)  # the empty prompt: zeros, as force_zeros_for_empty_prompt
    torch.testing.assert_close(ours_pooled[2:], neg_pooled)
    expected_ids = pipeline._get_add_time_ids((32, 32), (0, 0), (32, 32), dtype=torch.float32,
                                              text_encoder_projection_dim=bundle.pooled_dim)
    torch.testing.assert_close(time_ids, expected_ids.expand(4, 6))


def test_the_unet_sees_what_the_pipeline_gives_it(bundle, pipeline):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond, _, pooled, _ = pipeline.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                do_classifier_free_guidance=False)
    ids = pipeline._get_add_time_ids((48, 40), (4, 2), (32, 32), dtype=torch.float32,
                                     text_encoder_projection_dim=bundle.pooled_dim).expand(2, 6)
    expected = bundle.unet(x, 500, encoder_hidden_states=cond,
                           added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    context = conditioning.with_time_ids(bundle.encode_prompts(PROMPTS), ids, bundle.pooled_dim)
    torch.testing.assert_close(bundle.eps(x, 500, context), expected, atol=1e-5, rtol=0)
    # the size ids matter: the default ones give another prediction
    assert (bundle.eps(x, 500, bundle.encode_prompts(PROMPTS)) - expected).abs().max() > 1e-4


def test_the_unconditional_rows_take_each_rows_time_ids(bundle):
    ids = torch.tensor([[48.0, 40, 4, 2, 32, 32], [32, 32, 0, 0, 32, 32]])
    context = conditioning.with_time_ids(bundle.encode_prompts(PROMPTS), ids, bundle.pooled_dim)
    uncond = bundle.unconditional_like(context, bundle.encode_prompts([""]))
    hidden, pooled, time_ids = conditioning.unpack(uncond, bundle.pooled_dim)
    assert torch.equal(time_ids, ids)
    assert torch.count_nonzero(hidden) == 0 and torch.count_nonzero(pooled) == 0

    # the official iCD-XL training's unconditional pass: zero hidden states, the row's own pooled embedding
    context = conditioning.pack(*conditioning.unpack(context, bundle.pooled_dim)[:2], ids)
    training = bundle.unconditional_like(context, bundle.encode_prompts([""]), pooled_from_context=True)
    hidden, pooled, time_ids = conditioning.unpack(training, bundle.pooled_dim)
    assert torch.count_nonzero(hidden) == 0 and torch.equal(time_ids, ids)
    assert torch.equal(pooled, conditioning.unpack(context, bundle.pooled_dim)[1]) and torch.count_nonzero(pooled) > 0


def test_the_datas_size_ids_become_the_pipelines_time_ids(bundle, pipeline):
    """What training conditions a sample on: its original size and crop, the target size the resolution."""
    ids = bundle.tokenize(PROMPTS)
    sizes = torch.tensor([[480, 640, 0, 5], [40, 40, 0, 0]])
    context = bundle.encode_token_ids(ids, sizes)
    expected = torch.cat([pipeline._get_add_time_ids((480, 640), (0, 5), (32, 32), dtype=torch.float32,
                                                     text_encoder_projection_dim=bundle.pooled_dim),
                          pipeline._get_add_time_ids((40, 40), (0, 0), (32, 32), dtype=torch.float32,
                                                     text_encoder_projection_dim=bundle.pooled_dim)])
    torch.testing.assert_close(conditioning.time_ids_of(context, bundle.pooled_dim), expected)
    torch.testing.assert_close(context[:, :-1], bundle.encode_prompts(PROMPTS)[:, :-1])  # the text is the same
