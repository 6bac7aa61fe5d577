"""The toy base model: a tiny SD-shaped VAE, text encoder and UNet for the shapes world.

Same classes and layout as Stable Diffusion (diffusers ``AutoencoderKL`` and
``UNet2DConditionModel``, transformers ``CLIPTextModel`` with SD's tokenizer), so every code
path that runs on the toy preset runs unchanged on SD1.5.

Base v2: 32x32 images -> 16x16x4 latents (2x downsampling; v1's 4x, 8x8 latents, turned squares
and stars into blobs), a UNet whose finest level (16x16) has only resnets and whose 8x8 and
4x4 levels have cross-attention (where SD1.5 has it too: every level but the coarsest).
"""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

# Where the pretrained toy base model ships (package data, diffusers layout, fp16 safetensors).
TOY_BASE_DIR = Path(__file__).parent / "toy_base"

TEXT_HIDDEN = 64


def toy_vae(block_out_channels: tuple[int, ...] = (32, 64), layers_per_block: int = 2) -> AutoencoderKL:
    """0.84 M parameters, 32/64 channels, 2 resnets per level: 2x downsampling to 4 latent channels.

    Each extra level halves the latent side: ``(16, 32, 64)`` is v1's 4x (8x8 latents).
    """
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        block_out_channels=block_out_channels, layers_per_block=layers_per_block, norm_num_groups=8,
    )


def _text_config(hidden: int, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=49407, **extra)


def toy_text_encoder(hidden: int = TEXT_HIDDEN) -> CLIPTextModel:
    """A 2-layer CLIP text transformer (hidden 64) over SD's full 49,408-token vocabulary."""
    return CLIPTextModel(_text_config(hidden))


def toy_unet(channels: tuple[int, ...] = (64, 96, 96), cross_attention_dim: int = TEXT_HIDDEN,
             time_cond_proj_dim: int | None = None, sample_size: int = 16,
             plain_levels: int = 1) -> UNet2DConditionModel:
    """4.0 M parameters on 16x16 latents: 64/96/96 channels, cross-attention (dim 64) below the finest level.

    The first ``plain_levels`` levels have resnets only (attention over 256 tokens at 64 channels
    doubled a training step's time for no visible gain). ``up_blocks[1].resnets[1]`` exists, as in
    SD1.5, for Guide-and-Rescale's feature energy.
    """
    levels = len(channels)
    down = tuple("DownBlock2D" if i < plain_levels else "CrossAttnDownBlock2D" for i in range(levels))
    up = tuple("UpBlock2D" if levels - 1 - i < plain_levels else "CrossAttnUpBlock2D" for i in range(levels))
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=1,
        down_block_types=down, up_block_types=up,
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=min(32, channels[0]),
        time_cond_proj_dim=time_cond_proj_dim,
    )


def tiny_bundle(seed: int = 0, guidance_dim: int | None = None):
    """Random-weight components smaller than the toy model, for fast tests of every code path."""
    import torch

    from icd.models.bundle import ModelBundle
    from icd.models.tokenizer import offline_clip_tokenizer

    torch.manual_seed(seed)
    # v1's shapes (4x VAE, 8x8 latents, attention at every level) keep the tests of every code path fast.
    unet = toy_unet((32, 64), cross_attention_dim=32, time_cond_proj_dim=guidance_dim, sample_size=8, plain_levels=0)
    bundle = ModelBundle(unet=unet, vae=toy_vae((16, 32, 64), layers_per_block=1), text_encoder=toy_text_encoder(hidden=32),
                         tokenizer=offline_clip_tokenizer(), source="tiny")
    for module in (bundle.unet, bundle.vae, bundle.text_encoder):
        module.eval().requires_grad_(False)
    return bundle


def tiny_sdxl_bundle(seed: int = 0, guidance_dim: int | None = None, hidden: tuple[int, int] = (32, 32),
                     pooled_dim: int = 32, time_embed_dim: int = 8):
    """Random weights in SDXL's architecture, small enough for CPU tests of every code path.

    The real classes and wiring: two text encoders (``CLIPTextModel`` and
    ``CLIPTextModelWithProjection``, their penultimate hidden states concatenated into the
    cross-attention width), a UNet with ``addition_embed_type="text_time"`` taking the pooled
    embedding plus 6 size ids, SDXL's VAE scaling factor and its zeroed empty prompt.
    """
    import torch

    from icd.models.bundle import ModelBundle
    from icd.models.tokenizer import offline_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=sum(hidden), attention_head_dim=4, norm_num_groups=32, use_linear_projection=True,
        time_cond_proj_dim=guidance_dim, addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=pooled_dim + 6 * time_embed_dim,
    )
    vae = toy_vae((16, 32, 64), layers_per_block=1)
    vae.register_to_config(scaling_factor=0.13025)  # SDXL's VAE scaling
    bundle = ModelBundle(unet=unet, vae=vae, text_encoder=CLIPTextModel(_text_config(hidden[0])),
                         tokenizer=offline_clip_tokenizer(), source="tiny-sdxl",
                         text_encoder_2=CLIPTextModelWithProjection(_text_config(hidden[1], projection_dim=pooled_dim)),
                         tokenizer_2=offline_clip_tokenizer(pad_token="!"), zero_empty_prompt=True)
    for module in (bundle.unet, bundle.vae, *bundle.text_encoders):
        module.eval().requires_grad_(False)
    return bundle


def sd_scheduler() -> DDIMScheduler:
    """SD1.5's scheduler config: scaled_linear 0.00085 -> 0.012, 1000 steps, epsilon."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
