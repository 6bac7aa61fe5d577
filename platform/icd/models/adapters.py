"""The ``forward`` (encoder) and ``reverse`` (decoder) LoRA adapters on one UNet, via PEFT.

Saved per adapter in diffusers' LoRA format (``pytorch_lora_weights.safetensors``, the LoRA
config in its metadata) plus PEFT's ``adapter_config.json``; one directory per adapter, so
neither can overwrite the other.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path

from peft import LoraConfig

from icd.models.bundle import FORWARD, REVERSE

ADAPTERS = (FORWARD, REVERSE)


# model.lora_init -> PEFT's init_lora_weights
LORA_INITS = {"default": True, "gaussian": "gaussian"}


def lora_config(rank: int, alpha: float, targets: list[str], init: str = "default") -> LoraConfig:
    """LoRA on modules whose names end with one of ``targets`` (e.g. to_q, conv1, time_emb_proj;
    "conv" names the down/up-samplers' convolutions)."""
    if init not in LORA_INITS:
        raise ValueError(f"model.lora_init: expected one of {sorted(LORA_INITS)}, got {init!r}")
    pattern = r".*\.(" + "|".join(re.escape(t) for t in targets) + r")$"
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=LORA_INITS[init], target_modules=pattern)


@contextlib.contextmanager
def several_adapters_expected():
    """PEFT warns on every adapter after the first ("Already found a `peft_config` attribute"):
    two adapters on one UNet is this method's design, so that one warning is silenced here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
        yield


def add_adapters(unet, rank: int, alpha: float, targets: list[str], names=ADAPTERS, init: str = "default") -> None:
    """Attach one fresh LoRA adapter per name; the base weights are frozen, adapters trainable."""
    unet.requires_grad_(False)
    for name in names:
        with several_adapters_expected():
            unet.add_adapter(lora_config(rank, alpha, targets, init), adapter_name=name)
    for name, param in unet.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)


def add_adapters_from_config(unet, model_config) -> None:
    """Attach both adapters with the rank, alpha and target modules of an `icd.config.ModelConfig`."""
    add_adapters(unet, model_config.lora_rank, model_config.lora_alpha, list(model_config.lora_targets),
                 init=model_config.lora_init)


def save_adapter(unet, name: str, directory: str | Path) -> Path:
    directory = Path(directory)
    unet.save_lora_adapter(directory, adapter_name=name, safe_serialization=True)
    unet.peft_config[name].save_pretrained(directory)
    return directory


def load_adapter(unet, name: str, directory: str | Path) -> None:
    """Load an adapter saved by `save_adapter` (or a diffusers LoRA file) under ``name``."""
    directory = Path(directory)
    weights = directory / "pytorch_lora_weights.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"no pytorch_lora_weights.safetensors in {directory}")
    with several_adapters_expected():
        unet.load_lora_adapter(str(directory), adapter_name=name, prefix=None, use_safetensors=True)
