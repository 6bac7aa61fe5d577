"""The consistency target network: the online adapters themselves, or an EMA copy of them.

Consistency distillation compares the student at x_t with a target at the teacher's point
x_t'. With ``method.target_ema_decay = 0`` the target is the online student without
gradients (DESIGN.md's default). With a decay mu it is a frozen copy of each trained adapter,
moved after every optimizer step by theta_target <- mu theta_target + (1 - mu) theta, as in
consistency distillation and LCM (mu = 0.95). The copies are PEFT adapters named
``<adapter>_target`` on the same UNet, so `ModelBundle.adapter` switches to them like to any
other adapter; they are checkpointed with the run and never exported.
"""

from __future__ import annotations

import copy

import torch

from icd.models.adapters import several_adapters_expected


def target_name(adapter: str) -> str:
    return f"{adapter}_target"


@torch.no_grad()
def ema_update(target: list[torch.Tensor], online: list[torch.Tensor], decay: float) -> None:
    """theta_target <- decay * theta_target + (1 - decay) * theta, in place."""
    torch._foreach_lerp_(target, online, 1.0 - decay)


class EMATarget:
    """EMA copies of the adapters ``adapters`` on ``unet``, starting equal to them."""

    def __init__(self, unet: torch.nn.Module, adapters: tuple[str, ...], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"method.target_ema_decay: expected a value in (0, 1), got {decay}")
        self.decay, self.names = decay, {adapter: target_name(adapter) for adapter in adapters}
        # add_adapter makes the new adapter the active, trainable one: keep what trains as it was
        trainable = {name: p.requires_grad for name, p in unet.named_parameters()}
        for adapter, target in self.names.items():
            with several_adapters_expected():
                unet.add_adapter(copy.deepcopy(unet.peft_config[adapter]), adapter_name=target)
        params = dict(unet.named_parameters())
        self.pairs: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
        for name, param in params.items():
            param.requires_grad_(trainable.get(name, False))
            for adapter, target in self.names.items():
                if "lora_" in name and f".{adapter}." in name:
                    copy_name = name.replace(f".{adapter}.", f".{target}.")
                    self.pairs[copy_name] = (params[copy_name], param)
        with torch.no_grad():
            for target_param, online in self.pairs.values():
                target_param.copy_(online)

    def update(self) -> None:
        targets, online = zip(*self.pairs.values())
        ema_update(list(targets), list(online), self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: target.detach() for name, (target, _) in self.pairs.items()}

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        missing, unexpected = sorted(set(self.pairs) - set(weights)), sorted(set(weights) - set(self.pairs))
        if missing or unexpected:
            raise ValueError(f"EMA target weights do not match the model: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        with torch.no_grad():
            for name, (target, _) in self.pairs.items():
                target.copy_(weights[name].to(target.device, target.dtype))
