"""The toy base model: a tiny SD-shaped VAE, text encoder and UNet for the shapes world.

Same classes and layout as Stable Diffusion (diffusers ``AutoencoderKL`` and
``UNet2DConditionModel``, transformers ``CLIPTextModel`` with SD's tokenizer), so every code
path that runs on the toy preset runs unchanged on SD1.5. 32x32 images -> 8x8x4 latents.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

# Where the pretrained toy base model ships (package data, diffusers layout, fp16 safetensors).
TOY_BASE_DIR = Path(__file__).parent / "toy_base"

TEXT_HIDDEN = 64


def toy_vae() -> AutoencoderKL:
    """0.7 M parameters, 16/32/64 channels, 4x downsampling to 4 latent channels."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
    )


def toy_text_encoder(hidden: int = TEXT_HIDDEN) -> CLIPTextModel:
    """A 2-layer CLIP text transformer (hidden 64) over SD's full 49,408-token vocabulary."""
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))


def toy_unet(channels: tuple[int, int] = (64, 128), cross_attention_dim: int = TEXT_HIDDEN,
             time_cond_proj_dim: int | None = None) -> UNet2DConditionModel:
    """4.2 M parameters, 64/128 channels, cross-attention at both resolutions (dim 64).

    ``up_blocks[1].resnets[1]`` exists, as in SD1.5, for Guide-and-Rescale's feature energy.
    """
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=min(32, channels[0]),
        time_cond_proj_dim=time_cond_proj_dim,
    )


def tiny_bundle(seed: int = 0, guidance_dim: int | None = None):
    """Random-weight components smaller than the toy model, for fast tests of every code path."""
    import torch

    from icd.models.bundle import ModelBundle
    from icd.models.tokenizer import offline_clip_tokenizer

    torch.manual_seed(seed)
    bundle = ModelBundle(unet=toy_unet((32, 64), cross_attention_dim=32, time_cond_proj_dim=guidance_dim),
                         vae=toy_vae(), text_encoder=toy_text_encoder(hidden=32),
                         tokenizer=offline_clip_tokenizer(), source="tiny")
    for module in (bundle.unet, bundle.vae, bundle.text_encoder):
        module.eval().requires_grad_(False)
    return bundle


def sd_scheduler() -> DDIMScheduler:
    """SD1.5's scheduler config: scaled_linear 0.00085 -> 0.012, 1000 steps, epsilon."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
