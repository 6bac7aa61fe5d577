"""A model bundle: one UNet (with named LoRA adapters), VAE, text encoder, tokenizer, schedule.

The teacher is the same UNet with its adapters disabled; ``bundle.adapter("forward")``
switches for the duration of a ``with`` block and restores the previous state afterwards,
also after an exception.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from icd.diffusion.guidance import guidance_embedding
from icd.diffusion.schedule import scaled_linear_alphas_cumprod

# PEFT adapter names of the forward (encoder) and reverse (decoder) models. Not plain
# "forward": PEFT keeps adapters in nn.ModuleDicts, where that name clashes with Module.forward.
FORWARD, REVERSE = "icd_forward", "icd_reverse"


@dataclass
class ModelBundle:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    alphas_cumprod: torch.Tensor = field(default_factory=scaled_linear_alphas_cumprod)
    source: str = ""  # where the base weights came from (hub id, directory or s3:// URI)

    # --- facts --------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def guidance_dim(self) -> int | None:
        """The w-embedding size (``time_cond_proj_dim``) or None for a plain CFG UNet."""
        return self.unet.config.get("time_cond_proj_dim")

    @property
    def adapters(self) -> list[str]:
        return list(getattr(self.unet, "peft_config", {}) or {})

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    # --- adapters -------------------------------------------------------------------

    @contextlib.contextmanager
    def adapter(self, name: str | None):
        """Run the block with adapter ``name`` active, or the teacher (adapters disabled) for None."""
        if not self.adapters:
            if name is not None:
                raise KeyError(f"adapter {name!r} requested but the UNet has no adapters")
            yield
            return
        if name is not None and name not in self.adapters:
            raise KeyError(f"adapter {name!r} not on the UNet; it has {self.adapters}")
        previous = self._active_adapter()
        try:
            self._activate(name)
            yield
        finally:
            self._activate(previous)

    def _activate(self, name: str | None) -> None:
        """Make adapter ``name`` the only active one, or disable all adapters for None.

        PEFT's switch also flips ``requires_grad`` (active adapter trainable, others frozen);
        training decides what is trainable once, so that state is put back afterwards.
        """
        trainable = [(p, p.requires_grad) for n, p in self.unet.named_parameters() if "lora_" in n]
        if name is None:
            self.unet.disable_adapters()
        else:
            self.unet.enable_adapters()
            self.unet.set_adapter(name)
        for param, flag in trainable:
            param.requires_grad_(flag)

    def _active_adapter(self) -> str | None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in self.unet.modules():
            if isinstance(module, BaseTunerLayer):
                if module.disable_adapters:
                    return None
                active = module.active_adapters
                return active[0] if active else None
        return None

    # --- encoders -------------------------------------------------------------------

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """CLIP hidden states (B, 77, D) for the prompts; "" is the unconditional prompt."""
        return self.text_encoder(self.tokenize(prompts)).last_hidden_state.to(self.dtype)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> scaled latents (posterior mode)."""
        latents = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist.mode()
        return (latents * self.latent_scale).to(self.dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (not clamped)."""
        return self.vae.decode((latents / self.latent_scale).to(self.vae.dtype)).sample

    # --- the one UNet call --------------------------------------------------------------

    def eps(self, x: torch.Tensor, t, context: torch.Tensor, w=None) -> torch.Tensor:
        """One UNet evaluation; with a w-embedding, ``w`` (scalar or per sample) goes in as timestep_cond."""
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        cond = None
        if self.guidance_dim is not None:
            w = torch.zeros(x.shape[0]) if w is None else torch.as_tensor(w, dtype=torch.float32).expand(x.shape[0])
            cond = guidance_embedding(w, self.guidance_dim).to(x.device, self.dtype)
        elif w is not None and torch.as_tensor(w).abs().max() > 0:
            raise ValueError("this UNet has no guidance embedding; use CFG with two passes instead")
        return self.unet(x.to(self.dtype), t, encoder_hidden_states=context, timestep_cond=cond).sample
