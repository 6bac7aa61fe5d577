"""A model bundle: one UNet (with named LoRA adapters), VAE, text encoder, tokenizer, schedule.

The teacher is the same UNet with its adapters disabled; ``bundle.adapter("forward")``
switches for the duration of a ``with`` block and restores the previous state afterwards,
also after an exception.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
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
    prompt_cache_size: int = 0  # serving: prompt embeddings kept, least recently used dropped first (0: off)

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

        Sets each LoRA layer's state directly (what PEFT's ``BaseTunerLayer.set_adapter`` /
        ``enable_adapters`` set, without their ``requires_grad`` flips: training decides once what
        is trainable). diffusers' model-level ``set_adapter`` walks every module of the UNet on each
        call, a large share of a 4-step decode; the layer list is found once per set of adapters.
        """
        for layer in self._lora_layers():
            layer._disable_adapters = name is None
            if name is not None:
                layer._active_adapter = [name]

    def _lora_layers(self) -> list:
        """The UNet's PEFT tuner layers, looked up again only when the UNet or its adapters change."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        key = (id(self.unet), tuple(self.adapters))
        cached = self.__dict__.get("_layer_cache")
        if cached is None or cached[0] != key:
            cached = (key, [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)])
            self.__dict__["_layer_cache"] = cached
        return cached[1]

    def _active_adapter(self) -> str | None:
        layers = self._lora_layers()
        if not layers or layers[0].disable_adapters:
            return None
        active = layers[0].active_adapters
        return active[0] if active else None

    # --- encoders -------------------------------------------------------------------

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """CLIP hidden states (B, 77, D) for the prompts; "" is the unconditional prompt.

        With ``prompt_cache_size`` > 0 only prompts not seen recently reach the text encoder
        (real traffic repeats prompts); the text encoder is frozen, so a cached row is exact.
        """
        if self.prompt_cache_size <= 0:
            return self._encode(list(prompts))
        cache = self.__dict__.setdefault("_prompt_cache", OrderedDict())
        place = (str(self.device), self.dtype)
        keys = [(prompt, place) for prompt in prompts]
        missing = list(dict.fromkeys(key for key in keys if key not in cache))
        if missing:
            for key, row in zip(missing, self._encode([prompt for prompt, _ in missing])):
                cache[key] = row
        rows = []
        for key in keys:
            cache.move_to_end(key)
            rows.append(cache[key])
        while len(cache) > self.prompt_cache_size:
            cache.popitem(last=False)
        return torch.stack(rows)

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        # Outside inference mode even when called inside it: a cached row may later feed a guided
        # edit, which differentiates through the UNet (inference tensors cannot take part).
        with torch.inference_mode(False):
            return self.text_encoder(self.tokenize(prompts)).last_hidden_state.to(self.dtype)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> scaled latents (posterior mode)."""
        latents = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist.mode()
        return (latents * self.latent_scale).to(self.dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (not clamped)."""
        return self.vae.decode((latents / self.latent_scale).to(self.vae.dtype)).sample

    # --- the one UNet call --------------------------------------------------------------

    def guidance_cond(self, w, batch: int) -> torch.Tensor | None:
        """The UNet's ``timestep_cond`` for code w (scalar or per sample), on the UNet's device; None without a w-embedding."""
        if self.guidance_dim is None:
            if w is not None and torch.as_tensor(w).abs().max() > 0:
                raise ValueError("this UNet has no guidance embedding; use CFG with two passes instead")
            return None
        w = torch.zeros(batch) if w is None else torch.as_tensor(w, dtype=torch.float32).expand(batch)
        return guidance_embedding(w, self.guidance_dim).to(self.device, self.dtype)

    def eps(self, x: torch.Tensor, t, context: torch.Tensor, w=None, cond: torch.Tensor | None = None) -> torch.Tensor:
        """One UNet evaluation; with a w-embedding, ``w`` (scalar or per sample) goes in as timestep_cond.

        Step loops pass ``cond`` (from `guidance_cond`) and a device tensor ``t`` computed before the
        loop, so a step copies nothing from the host.
        """
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if cond is None:
            cond = self.guidance_cond(w, x.shape[0])
        return self.unet(x.to(self.dtype), t, encoder_hidden_states=context, timestep_cond=cond).sample
