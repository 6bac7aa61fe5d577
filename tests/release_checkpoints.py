"""Checkpoints laid out exactly as the official iCD code publishes them, built here (no hub access).

- a base model in diffusers layout: the toy VAE, text encoder and tokenizer with a UNet of SD1.5's
  architecture (four blocks, two layers each, cross-attention everywhere but the last) at reduced width;
- the teacher: that UNet with ``time_cond_proj_dim = 512``, random weights, saved as a tensor-only
  ``.pt`` state dict (``torch.save(unet.state_dict())``);
- per direction, a PEFT LoRA (rank 64, PEFT's default alpha 8, the official target list) with random
  ``lora_B`` (so it changes ε), saved as the training code saves it: ``get_peft_model_state_dict`` then
  ``StableDiffusionPipeline.save_lora_weights``, renamed after the boundaries.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

SD15_REDUCED_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 32, 64, 64), layers_per_block=2, cross_attention_dim=64, attention_head_dim=8,
    norm_num_groups=32,
)
OFFICIAL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
RANK = 64
SETS = {  # name -> (reverse starts ascending, forward starts), as released
    "4steps_1": ((259, 519, 779, 999), (19, 259, 519, 779)),
    "4steps_2": ((249, 499, 699, 999), (19, 249, 499, 699)),
    "3steps": ((339, 699, 999), (19, 339, 699)),
}


@dataclass
class ReleasedCheckpoints:
    root: Path
    base: Path
    teacher: Path

    def reverse(self, name: str = "4steps_1") -> Path:
        return self.root / f"iCD-SD15-reverse_{'_'.join(map(str, SETS[name][0]))}.safetensors"

    def forward(self, name: str = "4steps_1") -> Path:
        return self.root / f"iCD-SD15-forward_{'_'.join(map(str, SETS[name][1]))}.safetensors"


def official_lora_file(teacher, path: Path, seed: int) -> Path:
    """A LoRA file as the official training code writes it (keys ``unet.base_model.model.<module>.lora_A.weight``)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(teacher), LoraConfig(r=RANK, target_modules=OFFICIAL_TARGETS))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    StableDiffusionPipeline.save_lora_weights(str(path.parent / f"tmp-{seed}"), get_peft_model_state_dict(peft_model))
    (path.parent / f"tmp-{seed}" / "pytorch_lora_weights.safetensors").rename(path)
    (path.parent / f"tmp-{seed}").rmdir()
    return path


def build_released_checkpoints(root: Path) -> ReleasedCheckpoints:
    from diffusers import UNet2DConditionModel

    from icd.models.loading import load_bundle, save_bundle

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    bundle = load_bundle("toy")
    bundle.unet = UNet2DConditionModel(**SD15_REDUCED_UNET)
    base = save_bundle(bundle, root / "base")
    teacher = UNet2DConditionModel(**SD15_REDUCED_UNET, time_cond_proj_dim=512).eval()
    with torch.no_grad():  # a trained guidance embedding is not zero: make w matter
        teacher.time_embedding.cond_proj.weight.normal_(0, 0.05)
    torch.save(teacher.state_dict(), root / "sd15_cfg_distill.pt")
    files = ReleasedCheckpoints(root, base, root / "sd15_cfg_distill.pt")
    for i, name in enumerate(SETS):
        official_lora_file(teacher, files.reverse(name), seed=10 + 2 * i)
        official_lora_file(teacher, files.forward(name), seed=11 + 2 * i)
    return files


def kohya_state_dict(official: dict[str, torch.Tensor], alpha: float = 8.0) -> dict[str, torch.Tensor]:
    """The official inference code's renaming (utils/loading.py), in fp32: ``lora_unet_<module_with_underscores>``,
    ``lora_down`` / ``lora_up``, and an ``.alpha`` of 8 per module; diffusers' ``load_lora_weights`` reads it."""
    out = {}
    for key, weight in official.items():
        kohya = key.replace("unet.base_model.model", "lora_unet").replace("lora_A", "lora_down").replace(
            "lora_B", "lora_up")
        kohya = kohya.replace(".", "_", kohya.count(".") - 2)
        out[kohya] = weight.float()
        if "lora_down" in kohya:
            out[f"{kohya.split('.')[0]}.alpha"] = torch.tensor(alpha)
    return out


@dataclass
class ReleasedXLCheckpoints:
    """iCD-XL's layout: an SDXL-architecture base (`tiny_sdxl_bundle`), its teacher, the 4steps_2 set."""

    root: Path
    base: Path
    teacher: Path
    reverse: Path
    forward: Path


def build_released_xl_checkpoints(root: Path) -> ReleasedXLCheckpoints:
    from diffusers import UNet2DConditionModel

    from icd.models.loading import save_bundle
    from icd.models.toy import tiny_sdxl_bundle

    root.mkdir(parents=True, exist_ok=True)
    bundle = tiny_sdxl_bundle(seed=1)
    base = save_bundle(bundle, root / "base-xl")
    config = {k: v for k, v in bundle.unet.config.items() if not k.startswith("_")}
    torch.manual_seed(2)
    teacher = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": 512}).eval()
    with torch.no_grad():
        teacher.time_embedding.cond_proj.weight.normal_(0, 0.05)
    torch.save(teacher.state_dict(), root / "sdxl_cfg_distill.pt")
    reverse, forward = SETS["4steps_2"]
    files = ReleasedXLCheckpoints(root, base, root / "sdxl_cfg_distill.pt",
                                  root / f"iCD-SDXL-reverse_{'_'.join(map(str, reverse))}.safetensors",
                                  root / f"iCD-SDXL-forward_{'_'.join(map(str, forward))}.safetensors")
    official_lora_file(teacher, files.reverse, seed=20)
    official_lora_file(teacher, files.forward, seed=21)
    return files
