"""An SDXL base in diffusers layout loads with both text encoders, its empty-prompt rule and a VAE
kept out of fp16 (SDXL's VAE overflows there) unless another VAE is named."""

import json

import torch

from icd.models.loading import load_bundle, save_bundle
from icd.models.toy import tiny_sdxl_bundle

PROMPTS = ["a red circle on a blue background", ""]


def test_an_sdxl_directory_round_trips(tmp_path):
    bundle = tiny_sdxl_bundle(seed=6, guidance_dim=16)
    save_bundle(bundle, tmp_path / "sdxl")
    assert {p.name for p in (tmp_path / "sdxl").iterdir()} >= {"unet", "vae", "text_encoder", "text_encoder_2",
                                                               "tokenizer", "tokenizer_2", "model_index.json"}
    assert json.loads((tmp_path / "sdxl" / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is True
    loaded = load_bundle(str(tmp_path / "sdxl"))
    assert loaded.is_sdxl and loaded.zero_empty_prompt and loaded.tokenizer_2.pad_token == "!"
    torch.testing.assert_close(loaded.encode_prompts(PROMPTS), bundle.encode_prompts(PROMPTS), atol=0, rtol=0)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = bundle.encode_prompts(PROMPTS)
    torch.testing.assert_close(loaded.eps(x, 400, context, w=5.0), bundle.eps(x, 400, context, w=5.0))
    assert loaded.latent_scale == 0.13025


def test_in_fp16_the_sdxl_vae_stays_in_fp32_unless_a_fixed_vae_is_named(tmp_path):
    bundle = tiny_sdxl_bundle(seed=6)
    save_bundle(bundle, tmp_path / "sdxl")
    half = load_bundle(str(tmp_path / "sdxl"), dtype=torch.float16)
    assert half.unet.dtype == torch.float16 and half.vae.dtype == torch.float32
    assert half.text_encoder_2.dtype == torch.float16
    bundle.vae.save_pretrained(tmp_path / "fixed-vae", safe_serialization=True)
    fixed = load_bundle(str(tmp_path / "sdxl"), dtype=torch.float16, vae=str(tmp_path / "fixed-vae"))
    assert fixed.vae.dtype == torch.float16
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    latents = half.encode_images(images)  # fp32 VAE, fp16 latents for the UNet
    assert latents.dtype == torch.float16 and torch.isfinite(half.decode_latents(latents)).all()


def test_every_stage_trains_an_sdxl_base_and_its_output_loads_as_sdxl(tmp_path):
    """cfg_distill -> icd -> cycle a few steps each on the tiny SDXL base, as the stages hand over."""
    import numpy as np

    from icd.config import load_config
    from icd.data.shapes import render, sample_specs
    from icd.train.stages import StagePaths, build_stage_model, export_stage, load_stage_bundle, make_manifest

    save_bundle(tiny_sdxl_bundle(seed=7), tmp_path / "sdxl")
    config = load_config("jobs/configs/toy.yaml", [f"model.base={tmp_path / 'sdxl'}", "model.guidance_embedding_dim=16",
                                                   "model.lora_rank=4", "train.cfg_distill.lora=true"])
    specs = sample_specs(np.random.default_rng(0), 4)
    pixels = torch.from_numpy(np.stack([render(s).image for s in specs])).permute(0, 3, 1, 2)
    previous = None
    for stage in ("cfg_distill", "icd", "cycle"):
        model = build_stage_model(stage, config, previous)
        latents, context = model.encode_batch({"pixels": pixels, "input_ids": model.bundle.tokenize(
            [s.caption for s in specs])})
        assert context.shape == (4, 78, 64)  # the packed SDXL context
        params = list(model.trainable_parameters().values())
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        for step in range(2):
            out = model.objective(latents, context, torch.Generator().manual_seed(step))
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
            assert torch.isfinite(out["loss"])
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        paths = StagePaths.of(config, stage, "sdxl-unit", str(tmp_path / "stages"))
        export_stage(model, paths.output)
        previous = make_manifest(paths, config, previous, 2, [])
    loaded = load_stage_bundle(previous)
    assert loaded.is_sdxl and loaded.guidance_dim == 16 and set(loaded.adapters) >= {"icd_forward", "icd_reverse"}
    # the served form (adapters fused per direction) edits pictures, one pass per step, as the Editor calls it
    from PIL import Image

    from icd.editing.pipeline import EditPipeline, decode_batch, invert_batch

    served = EditPipeline.from_manifest(previous, config.editing, config.model.resolution, serving=config.serving)
    assert served.bundle.is_sdxl and served.bundle.text_encoder_2 is not None
    picture = Image.fromarray(render(specs[0]).image).resize((40, 24))
    edited = served.edit([picture], [specs[0].caption], ["a green circle on a blue background"])
    assert edited.nfe == 8 and edited.images[0].size == (40, 24)
    inverted = invert_batch(served, [picture], [specs[0].caption], [0])
    decoded = decode_batch(served, inverted.latents, ["a green circle"], [7.0], [0.8])
    assert decoded.images.shape == (1, 3, 32, 32) and torch.isfinite(decoded.images).all()
    assert served.memory()["text_encoder"] > sum(p.numel() * 4 for p in served.bundle.text_encoder.parameters())
