"""The sdxl preset against SDXL's real UNet shape, without weights: built on the meta device from
stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (values written out), so the parameter
count is the published one and every LoRA target and the packed conditioning are checked against it.
A real SDXL UNet in fp32 is ~10 GB: nothing here allocates it."""

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from icd.config import load_config
from icd.models import conditioning
from icd.models.adapters import add_adapters_from_config
from icd.models.guidance_unet import add_guidance_embedding

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")

SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
SDXL_PARAMETERS = 2_567_463_684  # the published SDXL base UNet
POOLED_DIM, HIDDEN_DIM = 1280, 768 + 1280  # OpenCLIP ViT-bigG projection; CLIP ViT-L + ViT-bigG hidden states


@pytest.fixture(scope="module")
def config():
    return load_config(REPO / "jobs/configs/sdxl.yaml")


@pytest.fixture(scope="module")
def unet():
    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_UNET_CONFIG)


def test_the_unet_is_sdxls(unet):
    assert sum(p.numel() for p in unet.parameters()) == SDXL_PARAMETERS


def test_every_lora_target_names_modules_of_the_sdxl_unet(config, unet):
    names = [name for name, _ in unet.named_modules()]
    matched = {target: sum(name.endswith(target) for name in names) for target in config.model.lora_targets}
    assert all(matched.values()), {t: n for t, n in matched.items() if not n}
    assert matched["downsamplers.0.conv"] == 2 and matched["upsamplers.0.conv"] == 2  # the XL code's extra two


def test_the_adapters_and_the_guidance_embedding_fit(config, unet):
    with torch.device("meta"):
        add_guidance_embedding(unet, config.model.guidance_embedding_dim)
        add_adapters_from_config(unet, config.model)
    assert unet.time_embedding.cond_proj.in_features == 512
    lora = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    assert lora > 0 and set(unet.peft_config) == {"icd_forward", "icd_reverse"}


def test_the_packed_conditioning_fits_sdxls_widths(config):
    assert POOLED_DIM + conditioning.TIME_IDS <= HIDDEN_DIM
    assert SDXL_UNET_CONFIG["projection_class_embeddings_input_dim"] == POOLED_DIM + 6 * 256
    context = conditioning.pack(torch.zeros(1, 77, HIDDEN_DIM), torch.ones(1, POOLED_DIM),
                                conditioning.size_time_ids((1024, 1024), (0, 0), (config.model.resolution,) * 2))
    hidden, pooled, ids = conditioning.unpack(context, POOLED_DIM)
    assert context.shape == (1, 78, 2048) and hidden.shape == (1, 77, 2048) and torch.equal(pooled, torch.ones(1, 1280))
    assert ids.tolist() == [[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]
