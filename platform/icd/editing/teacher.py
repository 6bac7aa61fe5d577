"""The baseline editor: the teacher's own DDIM-N inversion and decoding (about 150 UNet passes).

``switch``: invert with the source prompt (unguided), decode with the target prompt and dynamic
CFG. ``p2p``: decode ``[source rows; target rows]`` from the same inverted latents, the source
rows unguided, and let the target rows borrow the source rows' attention maps for the first
fractions of the steps (`icd.editing.p2p`), as Prompt-to-Prompt does with DDIM. With two-pass
CFG the unconditional pass of the target rows runs without control (P2P edits the conditional
half only). Both give the teacher's in-place editing ability the distilled editor is held against.
"""

from __future__ import annotations

import torch

from icd.diffusion import samplers
from icd.diffusion.guidance import cfg_combine, guidance_schedule
from icd.diffusion.samplers import SampleOutput
from icd.diffusion.schedule import alpha_sigma, ddim_jump
from icd.editing.attention import attention_control
from icd.editing.p2p import P2POptions, PromptToPromptController
from icd.models.bundle import ModelBundle

TEACHER_MODES = ("switch", "p2p")


class _Gate:
    """Passes attention through ``controller`` while ``on``, untouched otherwise."""

    def __init__(self, controller):
        self.controller, self.on = controller, True

    def __call__(self, probs, is_cross, layer):
        return self.controller(probs, is_cross, layer) if self.on else probs


@torch.no_grad()
def ddim_edit(bundle: ModelBundle, source_prompts: list[str], target_prompts: list[str], mode: str = "switch",
              images: torch.Tensor | None = None, latents: torch.Tensor | None = None, num_steps: int = 50,
              guidance: float = 7.0, tau: float | None = 0.8, p2p: P2POptions | None = None,
              decode: bool = True) -> SampleOutput:
    """Edit with the teacher (adapters off) in ``mode``; returns the target latents (and images) with the NFE."""
    if mode not in TEACHER_MODES:
        raise ValueError(f"mode must be one of {TEACHER_MODES}, got {mode!r}")
    if len(source_prompts) != len(target_prompts):
        raise ValueError(f"{len(source_prompts)} source prompts but {len(target_prompts)} target prompts")
    x0 = samplers.latents_from(bundle, images, latents)
    n = len(x0)
    contexts = bundle.encode_prompts(list(source_prompts) + list(target_prompts) + [""] * n)
    source, target, uncond = contexts[:n], contexts[n:2 * n], contexts[2 * n:]
    inverted = samplers.ddim_invert_latents(bundle, x0, source, num_steps)
    if mode == "switch":
        decoded = samplers.ddim_sample(bundle, inverted.latents, target, num_steps, guidance, tau, uncond)
        out = SampleOutput(decoded.latents, inverted.nfe + decoded.nfe)
    else:
        out = _p2p_decode(bundle, inverted, source_prompts, target_prompts, source, target, uncond, num_steps,
                          guidance, tau, p2p or P2POptions())
    if decode:
        out.images = bundle.decode_latents(out.latents)
    return out


def _p2p_decode(bundle, inverted, source_prompts, target_prompts, source, target, uncond, num_steps, guidance,
                tau, options) -> SampleOutput:
    n = len(source)
    alphas = bundle.alphas_cumprod
    timesteps = samplers.ddim_timesteps(num_steps, len(alphas))
    ws = guidance_schedule(timesteps, guidance, tau, len(alphas))
    controller = PromptToPromptController.for_prompts(options, len(timesteps), bundle.tokenizer,
                                                      list(source_prompts), list(target_prompts))
    gate = _Gate(controller)
    x, nfe = torch.cat([inverted.latents, inverted.latents]), inverted.nfe
    both = torch.cat([source, target])
    with bundle.adapter(None), attention_control(bundle.unet, gate):
        for step, (t, s, w) in enumerate(zip(timesteps, timesteps[1:] + [0], ws)):
            controller.step = step
            gate.on = True
            if bundle.guidance_dim is not None:  # guidance embedded: one pass, w per row
                eps = bundle.eps(x, t, both, torch.tensor([0.0] * n + [w] * n))
            else:
                eps = bundle.eps(x, t, both)
                if w != 0:
                    gate.on = False
                    eps = torch.cat([eps[:n], cfg_combine(eps[n:], bundle.eps(x[n:], t, uncond), w)])
                    nfe += 1
            nfe += 1
            x = ddim_jump(x, eps, *alpha_sigma(alphas, t), *alpha_sigma(alphas, s)).to(inverted.latents.dtype)
    return SampleOutput(x[n:], nfe)
