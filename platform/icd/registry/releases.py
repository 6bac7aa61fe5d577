"""The published iCD checkpoints: their names, key layouts, and the checks before one is registered.

Pure functions over file names and state dicts; `icd.registry.release_import` reads the files
and registers them. The official training code (yandex-research/invertible-cd) publishes:

- the guidance-distilled teacher: a full UNet state dict whose ``time_embedding.cond_proj``
  comes from ``time_cond_proj_dim = 512``, as a tensor-only ``.pt``;
- one LoRA safetensors per direction, PEFT's keys under ``unet.base_model.model.``
  (``...attn1.to_q.lora_A.weight``), rank 64 and PEFT's default alpha 8, which is not stored;
  the file names carry the boundaries: ``iCD-SD15-reverse_259_519_779_999.safetensors`` and
  ``iCD-SD15-forward_19_259_519_779.safetensors``; iCD-XL's are ``iCD-SDXL-...`` in the same layout
  (``sdxl_cfg_distill.pt``, the SDXL base's UNet with the same 512-wide guidance embedding).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from icd.diffusion.boundaries import Boundaries

OFFICIAL_PREFIX = "unet.base_model.model."
OFFICIAL_LORA_ALPHA = 8.0  # PEFT's default; the files do not store it (REFERENCE.md)
# The boundary sets the iCD authors released (reverse starts ascending, forward starts).
RELEASED_BOUNDARIES = {
    (259, 519, 779, 999): (19, 259, 519, 779),
    (249, 499, 699, 999): (19, 249, 499, 699),
    (339, 699, 999): (19, 339, 699),
}
GUIDANCE_KEY = "time_embedding.cond_proj.weight"
_BOUNDARY_NAME = re.compile(r"(?:^|[-_])(reverse|forward)_((?:\d+_)*\d+)(?:\.[A-Za-z]+)?$")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")


class ReleaseError(ValueError):
    """A release file that cannot be registered; the message names the file and what was expected."""


# --- boundaries ------------------------------------------------------------------------------

def boundaries_in_name(name: str) -> tuple[str, tuple[int, ...]] | None:
    """('reverse', (259, 519, 779, 999)) from '...-reverse_259_519_779_999.safetensors'; None if the name has none."""
    match = _BOUNDARY_NAME.search(name.rsplit("/", 1)[-1])
    if match is None:
        return None
    return match.group(1), tuple(int(t) for t in match.group(2).split("_"))


def mirrored_forward(reverse_ascending: tuple[int, ...], start: int) -> tuple[int, ...]:
    """The forward starts that mirror reverse segments: (start, r_1, ..., r_{m-1}) for reverse starts r_1 < ... < r_m."""
    return (start, *reverse_ascending[:-1])


def release_boundaries(reverse: tuple[int, ...] | None, forward: tuple[int, ...] | None,
                       start_timestep: int | None = None, num_train_timesteps: int = 1000) -> Boundaries:
    """Boundaries from the reverse and forward starts (either may be None and is then mirrored from the other).

    Each forward segment must be a reverse segment run backwards: the reverse starts (ascending) end at
    T - 1 and the forward starts after the first are the reverse starts but the last. ``start_timestep``
    (19 as published, 0 for Inverse-and-Edit's cycle-tuned encoder) replaces the first forward start.
    """
    top = num_train_timesteps - 1
    if reverse is None and forward is None:
        raise ReleaseError("no boundaries: name the adapter files as released (...-reverse_259_519_779_999, "
                           "...-forward_19_259_519_779) or pass --reverse-timesteps")
    if reverse is None:
        reverse = (*forward[1:], top)
    reverse = tuple(sorted(reverse))
    if reverse[-1] != top:
        raise ReleaseError(f"reverse starts {list(reverse)} must end at {top} (the decoder starts from noise)")
    if forward is None:
        forward = mirrored_forward(reverse, 19 if start_timestep is None else start_timestep)
    forward = tuple(forward)
    if len(forward) != len(reverse) or forward[1:] != reverse[:-1]:
        raise ReleaseError(f"forward starts {list(forward)} do not mirror reverse starts {list(reverse)}: "
                           f"expected {list(mirrored_forward(reverse, forward[0]))}")
    if start_timestep is not None:
        forward = (start_timestep, *forward[1:])
    if not 0 <= forward[0] < (forward[1] if len(forward) > 1 else top):
        raise ReleaseError(f"the forward start {forward[0]} must lie below the first boundary {forward[1:2]}")
    return Boundaries(tuple(reversed(reverse)), forward, num_train_timesteps)


def parse_timesteps(text: str, flag: str) -> tuple[int, ...]:
    """'259,519,779,999' -> (259, 519, 779, 999); the error names the flag."""
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise ReleaseError(f"{flag} {text!r}: expected comma-separated timesteps, e.g. 259,519,779,999") from None


# --- what a state dict is ---------------------------------------------------------------------

def looks_like_sdxl(keys: Iterable[str]) -> bool:
    """SDXL's UNet has the added-conditioning MLP and up to 10 transformer blocks per attention; SD1.5 one."""
    return any("add_embedding" in key or re.search(r"transformer_blocks\.[1-9]", key) for key in keys)


def check_tensors(state: Mapping, source: str) -> None:
    if not isinstance(state, Mapping) or not state:
        raise ReleaseError(f"{source}: expected a state dict (name -> tensor), got {type(state).__name__}")
    bad = next((key for key, value in state.items() if not isinstance(value, torch.Tensor)), None)
    if bad is not None:
        raise ReleaseError(f"{source}: entry {bad!r} is a {type(state[bad]).__name__}, not a tensor")


def teacher_guidance_dim(state: Mapping[str, torch.Tensor], source: str, base_is_sdxl: bool = False) -> int:
    """The teacher's ``time_cond_proj_dim`` (512 as released), after refusing plain UNets and another
    architecture than the base's (an SDXL teacher on an SD1.5 base, or the reverse)."""
    check_tensors(state, source)
    if looks_like_sdxl(state) != base_is_sdxl:
        teacher, base = ("an SDXL", "SD1.5") if not base_is_sdxl else ("an SD1.5", "SDXL")
        raise ReleaseError(f"{source} is {teacher} UNet but --base is {base}: give the base it was distilled from "
                           "(stabilityai/stable-diffusion-xl-base-1.0 for iCD-XL, with --config "
                           "jobs/configs/sdxl.yaml; stable-diffusion-v1-5/stable-diffusion-v1-5 for iCD-SD15)")
    weight = state.get(GUIDANCE_KEY)
    if weight is None:
        raise ReleaseError(f"{source} has no guidance embedding ({GUIDANCE_KEY}): the released adapters only work "
                           "on the guidance-distilled teacher (sd15_cfg_distill.pt), not on plain SD1.5")
    return int(weight.shape[1])


def peft_lora_state(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Official keys (``unet.base_model.model.<module>.lora_A.weight``) -> PEFT's (``<module>.lora_A.weight``)."""
    check_tensors(state, source)
    converted = {}
    for key, value in state.items():
        if not key.startswith(OFFICIAL_PREFIX) or not _LORA_KEY.match(key[len(OFFICIAL_PREFIX):]):
            raise ReleaseError(f"{source}: key {key!r} is not an official iCD LoRA key "
                               f"({OFFICIAL_PREFIX}<module>.lora_A.weight / .lora_B.weight)")
        converted[key[len(OFFICIAL_PREFIX):]] = value
    return converted


def lora_modules(peft_state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Module path -> {'lora_A': A, 'lora_B': B}."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in peft_state.items():
        match = _LORA_KEY.match(key)
        modules.setdefault(match["module"], {})[match["part"]] = value
    return modules


def lora_rank(peft_state: Mapping[str, torch.Tensor], source: str) -> int:
    ranks = {value.shape[0] for key, value in peft_state.items() if ".lora_A." in key}
    if len(ranks) != 1:
        raise ReleaseError(f"{source}: expected one LoRA rank for all modules, found {sorted(ranks)}")
    return ranks.pop()


def _dims(module: torch.nn.Module) -> tuple[int, int]:
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, torch.nn.Conv2d):
        return module.in_channels, module.out_channels
    raise TypeError(type(module).__name__)


def check_lora_matches(peft_state: Mapping[str, torch.Tensor], unet: torch.nn.Module, source: str,
                       show: int = 3) -> None:
    """Refuse LoRA weights that do not fit ``unet``, naming the first missing / unexpected / misshapen keys.

    Unexpected: a module the UNet does not have (or not a Linear / Conv2d). Missing: a module of the
    UNet of a kind the file adapts elsewhere (a suffix such as ``to_q``) that the file leaves out,
    e.g. a truncated file or one trained on a UNet of another depth.
    """
    named = dict(unet.named_modules())
    modules = lora_modules(peft_state)
    incomplete = sorted(f"{m}.{'lora_B' if 'lora_A' in parts else 'lora_A'}.weight"
                        for m, parts in modules.items() if len(parts) != 2)
    unexpected = sorted(f"{m}.lora_A.weight" for m in modules
                        if not isinstance(named.get(m), (torch.nn.Linear, torch.nn.Conv2d)))
    adapted_kinds = {_kind(m) for m in modules}
    missing = sorted(f"{name}.lora_A.weight" for name, module in named.items()
                     if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and _kind(name) in adapted_kinds
                     and name not in modules)
    problems = []
    if incomplete or missing:
        keys = (incomplete + missing)[:show]
        problems.append(f"missing keys {keys}" + (f" and {len(incomplete) + len(missing) - show} more"
                                                  if len(incomplete) + len(missing) > show else ""))
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:show]}" + (f" and {len(unexpected) - show} more"
                                                                  if len(unexpected) > show else ""))
    if not problems:
        for m, parts in sorted(modules.items()):
            fan_in, fan_out = _dims(named[m])
            a, b = parts["lora_A"], parts["lora_B"]
            if a.shape[1] != fan_in or b.shape[0] != fan_out or b.shape[1] != a.shape[0]:
                problems.append(f"key {m}.lora_A/B.weight has shapes {tuple(a.shape)} / {tuple(b.shape)}, "
                                f"the UNet's {m} maps {fan_in} -> {fan_out}")
                break
    if problems:
        raise ReleaseError(f"{source} does not match the teacher UNet: {'; '.join(problems)} "
                           f"(PEFT LoRA keys, after removing {OFFICIAL_PREFIX!r})")


def _kind(module: str) -> str:
    """What a module is wherever it sits: its last two names once block and layer numbers are removed.

    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` -> ``attn1.to_q``;
    ``up_blocks.0.resnets.2.conv1`` -> ``resnets.conv1``. The kinds a file adapts define a complete file.
    """
    return ".".join(re.sub(r"\.\d+(?=\.)", "", module).split(".")[-2:])
