"""Give a UNet the guidance-scale embedding (Meng et al. 2023) that CFG distillation trains."""

from __future__ import annotations

import torch


def add_guidance_embedding(unet, dim: int) -> None:
    """Add ``time_embedding.cond_proj`` (w-embedding -> timestep features), zero-initialised.

    Zero init keeps the student exactly equal to the teacher at step 0 (the public LCM-style
    scripts left it random). Afterwards ``unet.config.time_cond_proj_dim == dim`` and the
    UNet takes ``timestep_cond``, exactly as if built with that config.
    """
    if unet.config.get("time_cond_proj_dim") is not None:
        raise ValueError(f"UNet already has a guidance embedding (time_cond_proj_dim={unet.config.time_cond_proj_dim})")
    embedding = unet.time_embedding
    param = next(unet.parameters())
    embedding.cond_proj = torch.nn.Linear(dim, embedding.linear_1.in_features, bias=False).to(param.device, param.dtype)
    torch.nn.init.zeros_(embedding.cond_proj.weight)
    unet.register_to_config(time_cond_proj_dim=dim)
