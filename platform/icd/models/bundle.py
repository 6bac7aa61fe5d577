"""A model bundle: one UNet (with named LoRA adapters), VAE, text encoder(s), tokenizer(s), schedule.

SD1.5 has one text encoder; SDXL two (``text_encoder_2`` / ``tokenizer_2``) and extra UNet inputs,
which ride inside the context tensor (`icd.models.conditioning`): the rest of the code passes one
context per sample for either.

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
from icd.models import conditioning
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
    text_encoder_2: torch.nn.Module | None = None  # SDXL: CLIPTextModelWithProjection (pooled embedding)
    tokenizer_2: object = None
    # SDXL's ``force_zeros_for_empty_prompt``: the unconditional prompt "" is all zeros, not encoded
    zero_empty_prompt: bool = False

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

    @property
    def is_sdxl(self) -> bool:
        """An SDXL UNet: it takes pooled text embeddings and size ids (``addition_embed_type="text_time"``)."""
        return self.unet.config.get("addition_embed_type") == "text_time"

    @property
    def pooled_dim(self) -> int:
        """SDXL: the width of the second text encoder's projected (pooled) embedding."""
        return int(self.text_encoder_2.config.projection_dim)

    @property
    def resolution(self) -> int:
        """The image size the UNet was built for (latent ``sample_size`` x the VAE's downsampling)."""
        return int(self.unet.config.sample_size) * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

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

        SDXL: (B, 78, 2048), its pooled embedding and the time ids of an image at `resolution`
        packed in the last token (`icd.models.conditioning`); "" is zeros with those time ids.

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
            return self.encode_token_ids(self.tokenize(prompts)).to(self.dtype)

    def encode_token_ids(self, ids: torch.Tensor, size_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The context for ``tokenizer``'s ids (B, 77): what `encode_prompts` returns for those prompts.

        ``size_ids`` (B, 4): each image's original (height, width) and crop (top, left), from the data
        (`icd.data.reader`); SDXL then conditions on them with the target size `resolution`, as its
        training did. None: every image as an uncropped square at `resolution`. Ignored by SD1.5.

        SDXL as diffusers' SDXL pipelines encode: both encoders' penultimate hidden states side by
        side, the second's projected pooled output, zeros for "" under ``force_zeros_for_empty_prompt``
        (ids <bos><eos><pad>...), and the time ids of an image at `resolution`. The second tokenizer
        is the same BPE padding with another token, so its ids are these with the padding replaced.
        """
        if not self.is_sdxl:
            return self.text_encoder(ids).last_hidden_state
        if self.text_encoder_2 is None or self.tokenizer_2 is None:
            raise ValueError("an SDXL UNet needs text_encoder_2 and tokenizer_2 in its bundle")
        hidden = [self.text_encoder(ids, output_hidden_states=True).hidden_states[-2]]
        out = self.text_encoder_2(second_tokenizer_ids(ids, self.tokenizer.eos_token_id, self.tokenizer_2.pad_token_id),
                                  output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        hidden, pooled = torch.cat(hidden, dim=-1), out.text_embeds
        if self.zero_empty_prompt:
            empty = ids[:, 1] == self.tokenizer.eos_token_id
            hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        r = self.resolution
        if size_ids is None:
            return conditioning.pack(hidden, pooled, conditioning.size_time_ids((r, r), (0, 0), (r, r)))
        target = torch.tensor([r, r], dtype=torch.float32, device=size_ids.device).expand(len(size_ids), 2)
        return conditioning.pack(hidden, pooled, torch.cat([size_ids.float(), target], dim=1))

    def unconditional_like(self, context: torch.Tensor, uncond: torch.Tensor | None = None,
                           pooled_from_context: bool = False) -> torch.Tensor:
        """The unconditional context (``uncond``'s first row, else "" encoded) for each row of ``context``.

        SDXL: with that row's time ids, as diffusers' pipelines give both CFG passes the same ids.
        ``pooled_from_context`` also keeps the row's pooled text embedding, zeroing only the hidden
        states: the unconditional pass the official iCD-XL (and diffusers' LCM-SDXL) training uses,
        where inference (``force_zeros_for_empty_prompt``) zeroes both.
        """
        uncond = self.encode_prompts([""]) if uncond is None else uncond[:1]
        uncond = uncond.to(context.device, context.dtype).expand(context.shape[0], -1, -1)
        if not self.is_sdxl:
            return uncond
        hidden, pooled, _ = conditioning.unpack(uncond, self.pooled_dim)
        _, row_pooled, time_ids = conditioning.unpack(context, self.pooled_dim)
        return conditioning.pack(hidden, row_pooled if pooled_from_context else pooled, time_ids)

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
        return self.unet(x.to(self.dtype), t, timestep_cond=cond, **self.unet_kwargs(context)).sample

    def unet_kwargs(self, context: torch.Tensor) -> dict:
        """The context as UNet keyword arguments: ``encoder_hidden_states``, and SDXL's ``added_cond_kwargs``."""
        if not self.is_sdxl:
            return {"encoder_hidden_states": context}
        hidden, pooled, time_ids = conditioning.unpack(context, self.pooled_dim)
        return {"encoder_hidden_states": hidden, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def second_tokenizer_ids(ids: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """SDXL's second tokenizer's ids from the first's: every position after the first <eos> becomes ``pad_id``."""
    after_eos = (ids == eos_id).int().cumsum(dim=1) - (ids == eos_id).int() > 0
    return torch.where(after_eos, torch.full_like(ids, pad_id), ids)
