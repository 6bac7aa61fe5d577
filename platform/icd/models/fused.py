"""Serving weights: one plain UNet per direction with its LoRA merged in, so an edit runs no adapter code.

Training and evaluation keep one UNet with both adapters (`ModelBundle.adapter` switches
them); a served model only ever runs the forward model then the reverse one, so each gets its
own copy of the UNet with its LoRA fused into the base weights (diffusers' ``fuse_lora`` for
that adapter, then ``unload_lora``). Memory: two UNets instead of one, e.g. 2 x 1.7 GB for
SD1.5 in fp16.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass, field

import torch

from icd.models.bundle import FORWARD, REVERSE, ModelBundle


@dataclass
class FusedBundle(ModelBundle):
    """A `ModelBundle` whose ``adapter(name)`` selects the plain UNet fused with that adapter.

    ``unet`` is the reverse model outside an ``adapter`` block (generation, config lookups).
    The teacher (adapters disabled) is not kept: serving never runs it.
    """

    directions: dict[str, torch.nn.Module] = field(default_factory=dict)

    @property
    def adapters(self) -> list[str]:
        return list(self.directions)

    @contextlib.contextmanager
    def adapter(self, name: str | None):
        if name not in self.directions:
            raise KeyError(f"adapter {name!r}: this fused serving bundle holds {self.adapters} only "
                           "(load the stage output unfused for the teacher or other adapters)")
        previous = self.unet
        self.unet = self.directions[name]
        try:
            yield
        finally:
            self.unet = previous


def fused_unet(unet: torch.nn.Module, adapter: str) -> torch.nn.Module:
    """A copy of ``unet`` with ``adapter``'s LoRA merged into the weights and every LoRA layer removed."""
    if adapter not in (getattr(unet, "peft_config", None) or {}):
        raise KeyError(f"adapter {adapter!r} not on the UNet")
    fused = copy.deepcopy(unet)
    fused.fuse_lora(adapter_names=[adapter])
    fused.unload_lora()
    return fused.requires_grad_(False).eval()


def fuse_directions(bundle: ModelBundle, names: tuple[str, ...] = (FORWARD, REVERSE)) -> FusedBundle:
    """The serving form of a trained bundle: one fused UNet per direction; the unfused UNet is dropped."""
    directions = {name: fused_unet(bundle.unet, name) for name in names}
    shared = {f.name: getattr(bundle, f.name) for f in dataclasses.fields(ModelBundle) if f.name != "unet"}
    return FusedBundle(unet=directions[names[-1]], directions=directions, **shared)


def parameter_bytes(*modules: torch.nn.Module) -> int:
    """Bytes held by the parameters and buffers of the modules (each tensor counted once)."""
    seen, total = set(), 0
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


def bundle_memory(bundle: ModelBundle) -> dict[str, int]:
    """Weight memory of a bundle by component, in bytes (what a serving replica holds besides activations)."""
    unets = list(bundle.directions.values()) if isinstance(bundle, FusedBundle) else [bundle.unet]
    return {"unet": parameter_bytes(*unets), "vae": parameter_bytes(bundle.vae),
            "text_encoder": parameter_bytes(*bundle.text_encoders),
            "total": parameter_bytes(*unets, bundle.vae, *bundle.text_encoders)}
