"""The production model shape, without downloading it: SD1.5's UNet from its published config
with random weights, plus the guidance embedding and both LoRA adapters exactly as the `sd15`
preset configures them, run once on CPU at a small latent size.

What this catches that the toy-model tests cannot: a LoRA target that names no module of the
real UNet (PEFT would then silently adapt fewer layers), a guidance-embedding size that does
not fit SD1.5's time embedding, and adapters that are not independent of each other.
One fp32 SD1.5 UNet is ~3.4 GB of memory; the forward passes at 16x16 latents take seconds.
"""

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from icd.config import load_config
from icd.models.adapters import ADAPTERS, add_adapters_from_config
from icd.models.bundle import FORWARD, REVERSE, ModelBundle
from icd.models.guidance_unet import add_guidance_embedding

REPO = Path(__file__).resolve().parents[2]

# PEFT warns when a second adapter joins the first: two adapters on one UNet is the design.
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")

# stable-diffusion-v1-5 unet/config.json (REFERENCE.md; the values that differ from diffusers'
# UNet2DConditionModel defaults are written out, the rest are those defaults, spelled out too
# so that a change of defaults in diffusers cannot change this test's model).
SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)
SD15_PARAMETERS = 859_520_964  # the published SD1.5 UNet, before the guidance embedding
TEXT_TOKENS, TEXT_DIM = 77, 768  # CLIP ViT-L/14 hidden states


@pytest.fixture(scope="module")
def sd15_config():
    return load_config(REPO / "jobs/configs/sd15.yaml")


@pytest.fixture(scope="module")
def sd15_bundle(sd15_config):
    """The SD1.5 UNet with the preset's guidance embedding and both adapters, in a bundle
    (no VAE or text encoder: the UNet call is all this test needs)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval()
    assert sum(p.numel() for p in unet.parameters()) == SD15_PARAMETERS, "not the SD1.5 UNet architecture"
    add_guidance_embedding(unet, sd15_config.model.guidance_embedding_dim)
    add_adapters_from_config(unet, sd15_config.model)
    return ModelBundle(unet=unet, vae=None, text_encoder=None, tokenizer=None, source="sd15-architecture")


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=generator)
    return latents, context


def eps(bundle, inputs, adapter, w=7.0):
    latents, context = inputs
    with torch.no_grad(), bundle.adapter(adapter):
        return bundle.eps(latents, 519, context, w=w)


def test_every_production_lora_target_exists_in_sd15(sd15_bundle, sd15_config):
    """Each name in model.lora_targets adapts at least one SD1.5 module, for both adapters."""
    from peft.tuners.lora import LoraLayer

    adapted: dict[str, set[str]] = {}
    for name, module in sd15_bundle.unet.named_modules():
        if isinstance(module, LoraLayer):
            target = next((t for t in sd15_config.model.lora_targets if name.endswith("." + t)), None)
            assert target is not None, f"{name} is adapted but matches no lora_targets entry"
            adapted.setdefault(target, set()).update(module.lora_A.keys())
    missing = [t for t in sd15_config.model.lora_targets if t not in adapted]
    assert not missing, f"model.lora_targets {missing} name no module of the SD1.5 UNet"
    for target, adapters in adapted.items():
        assert adapters == set(ADAPTERS), f"{target}: adapters {sorted(adapters)}, expected {sorted(ADAPTERS)}"
    assert sd15_bundle.unet.config.time_cond_proj_dim == sd15_config.model.guidance_embedding_dim


def test_forward_pass_shape_and_adapters_start_as_the_teacher(sd15_bundle, inputs):
    teacher = eps(sd15_bundle, inputs, None)
    assert teacher.shape == inputs[0].shape
    assert torch.isfinite(teacher).all()
    # LoRA B starts at zero, so either adapter is exactly the teacher until trained.
    for adapter in (FORWARD, REVERSE):
        assert torch.equal(eps(sd15_bundle, inputs, adapter), teacher), f"{adapter} differs from the teacher at init"


def test_guidance_embedding_reaches_the_output(sd15_bundle, inputs):
    """Zero-initialised, w changes nothing; once its projection has weights, w changes the output."""
    assert torch.equal(eps(sd15_bundle, inputs, None, w=0.0), eps(sd15_bundle, inputs, None, w=7.0))
    cond_proj = sd15_bundle.unet.time_embedding.cond_proj
    saved = cond_proj.weight.detach().clone()
    try:
        with torch.no_grad():
            cond_proj.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(2))
        unguided, guided = eps(sd15_bundle, inputs, None, w=0.0), eps(sd15_bundle, inputs, None, w=7.0)
        assert torch.isfinite(guided).all()
        assert not torch.allclose(unguided, guided), "w does not reach the UNet output through timestep_cond"
    finally:
        with torch.no_grad():
            cond_proj.weight.copy_(saved)


def test_a_trained_adapter_changes_only_its_own_output(sd15_bundle, inputs):
    """Perturbing the forward adapter's LoRA B in one layer changes the forward model only."""
    layer = sd15_bundle.unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_q
    lora_b = layer.lora_B[FORWARD].weight
    teacher = eps(sd15_bundle, inputs, None)
    saved = lora_b.detach().clone()
    try:
        with torch.no_grad():
            lora_b.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(3))
        forward, reverse = eps(sd15_bundle, inputs, FORWARD), eps(sd15_bundle, inputs, REVERSE)
        assert torch.isfinite(forward).all()
        assert not torch.allclose(forward, teacher), "the forward adapter's weights do not reach the output"
        assert torch.equal(reverse, teacher), "changing the forward adapter changed the reverse model"
        assert torch.equal(eps(sd15_bundle, inputs, None), teacher), "the teacher (adapters off) changed"
    finally:
        with torch.no_grad():
            lora_b.copy_(saved)
