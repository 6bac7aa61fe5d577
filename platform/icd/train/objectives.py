"""What each stage minimises: the loss terms as functions, and one objective module per stage.

The terms take their random draws (timesteps, guidance scales, noise) as arguments, so each
is a deterministic function of its inputs that a test can recompute by hand. The objective
modules draw them and sum the terms. Ray Train wraps the whole objective in DDP: the UNet is
called several times per step (student, teacher, target, with different adapters), which
DDP allows inside one wrapped forward but not as several wrapped calls.

Guidance notation: ``eps_w = eps(c) + w (eps(c) - eps(empty))`` (code w = 7 is classical CFG 8).
"""

from __future__ import annotations

import dataclasses

import torch

from icd.diffusion.boundaries import Boundaries, teacher_timestep
from icd.diffusion.samplers import consistency_decode, consistency_encode
from icd.diffusion.schedule import add_noise, ddim_jump_timesteps, jump_eps_gain
from icd.losses.consistency import consistency_loss
from icd.losses.cycle import PatchLPIPS, cycle_loss
from icd.losses.distill import cfg_distillation_loss
from icd.losses.preservation import forward_preservation_loss, reverse_preservation_loss
from icd.models.bundle import FORWARD, REVERSE, ModelBundle

# The LoRA adapter that CFG distillation trains when ``train.cfg_distill.lora`` is on.
GUIDANCE_ADAPTER = "icd_guidance"


def consistency_jump(bundle: ModelBundle, adapter: str | None, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                     context: torch.Tensor, w) -> torch.Tensor:
    """f(x_t, t -> s): the DDIM jump from t to the boundary s with the adapter's epsilon."""
    with bundle.adapter(adapter):
        eps = bundle.eps(x, t, context, w)
    return ddim_jump_timesteps(bundle.alphas_cumprod, x, eps, t, s)


def reverse_guidance_scales(method) -> list[float]:
    """The codes w of the reverse consistency targets: ``method.reverse_guidance_scales``, else ``guidance_scales``."""
    return list(method.reverse_guidance_scales or method.guidance_scales)


def teacher_grid(num_train_timesteps: int, step: int) -> torch.Tensor:
    """The teacher's timestep grid, descending from T - 1 in steps of ``step``: 999, 979, ..., 19."""
    return torch.arange(num_train_timesteps - 1, -1, -step)


# --- the loss terms -------------------------------------------------------------------------

def guidance_distillation_term(student_eps: torch.Tensor, teacher_eps_cond: torch.Tensor,
                               teacher_eps_uncond: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """MSE(student(x_t, t, c, w), eps_c + w (eps_c - eps_u))."""
    return cfg_distillation_loss(student_eps, teacher_eps_cond, teacher_eps_uncond, w)


def distance_scale(bundle: ModelBundle, t: torch.Tensor, s: torch.Tensor, space: str) -> torch.Tensor | None:
    """What the consistency distance divides by (``method.consistency_space``): None on latents, the jump's eps gain."""
    if space == "latent":
        return None
    if space == "eps":
        return jump_eps_gain(bundle.alphas_cumprod, t, s)
    raise ValueError(f"method.consistency_space: expected 'latent' or 'eps', got {space!r}")


def reverse_consistency_term(bundle: ModelBundle, x0, context, t, w, noise, boundaries: Boundaries,
                             teacher_step: int, huber_c: float, target: str = REVERSE,
                             space: str = "latent") -> torch.Tensor:
    """d(f_rev(x_t, t -> s), stopgrad f_target(x_t', t' -> s)), x_t' = guided teacher DDIM step t -> max(t - step, s).

    ``target`` names the adapter of the target network: the student's own or its EMA copy. ``space``: see
    `distance_scale`.
    """
    x_t = add_noise(bundle.alphas_cumprod, x0, noise, t).to(x0.dtype)
    s = boundaries.reverse_boundary(t)
    student = consistency_jump(bundle, REVERSE, x_t, t, s, context, w)
    with torch.no_grad():
        t_teacher = teacher_timestep(t, s, teacher_step, "reverse")
        with bundle.adapter(None):
            eps = bundle.eps(x_t, t, context, w)
        x_teacher = ddim_jump_timesteps(bundle.alphas_cumprod, x_t, eps, t, t_teacher).to(x0.dtype)
        x_target = consistency_jump(bundle, target, x_teacher, t_teacher, s, context, w)
        # On the boundary the consistency function is the identity (t' = 0 is the clean sample).
        on_boundary = (t_teacher == s).reshape(-1, *([1] * (x0.dim() - 1)))
        x_target = torch.where(on_boundary, x_teacher, x_target)
    return consistency_loss(student, x_target, huber_c, distance_scale(bundle, t, s, space))


def forward_consistency_term(bundle: ModelBundle, x0, context, t, noise, boundaries: Boundaries,
                             teacher_step: int, huber_c: float, target: str = FORWARD,
                             space: str = "latent") -> torch.Tensor:
    """d(f_fwd(x_t, t -> s), stopgrad f_target(x_t'', t'' -> s)), unguided teacher inversion step t -> min(t + step, s)."""
    x_t = add_noise(bundle.alphas_cumprod, x0, noise, t).to(x0.dtype)
    s = boundaries.forward_boundary(t)
    student = consistency_jump(bundle, FORWARD, x_t, t, s, context, 0.0)
    with torch.no_grad():
        t_teacher = teacher_timestep(t, s, teacher_step, "forward")
        with bundle.adapter(None):
            eps = bundle.eps(x_t, t, context, 0.0)
        x_teacher = ddim_jump_timesteps(bundle.alphas_cumprod, x_t, eps, t, t_teacher).to(x0.dtype)
        x_target = consistency_jump(bundle, target, x_teacher, t_teacher, s, context, 0.0)
    return consistency_loss(student, x_target, huber_c, distance_scale(bundle, t, s, space))


def segment_ends(boundaries: Boundaries, segment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hi, lo, forward start) of reverse segments: the decoder maps hi -> lo, the encoder maps back from
    lo (or from its first timestep, 19, when lo is the clean sample) to hi."""
    hi = torch.tensor(boundaries.reverse_timesteps)[segment]
    lo = torch.tensor(boundaries.reverse_targets)[segment]
    start = torch.where(lo == 0, torch.full_like(lo, boundaries.forward_timesteps[0]), lo)
    return hi, lo, start


def check_mirrored(boundaries: Boundaries) -> None:
    """Preservation losses need each reverse segment to be a forward segment run backwards."""
    segments = torch.arange(len(boundaries.reverse_timesteps))
    hi, _, start = segment_ends(boundaries, segments)
    if not torch.equal(boundaries.forward_boundary(start), hi):
        raise ValueError(
            f"method.forward_timesteps {list(boundaries.forward_timesteps)} do not mirror method.reverse_timesteps "
            f"{list(boundaries.reverse_timesteps)}: the encoder segments must end where the decoder segments start")


# How the preservation losses treat the segment that ends at the clean latent (lo = 0), where the
# encoder starts from its first timestep (19) instead:
#   "jump"    the official iCD form: the decoder's DDIM jump lands on 19 with its own epsilon (Lf),
#             and Lr's input and target are x_19 = add_noise(x0, noise, 19); both are
#             deterministic functions of the segment's noisy end, so the encoder can invert them;
#   "renoise" this project's first form: the decoder lands on the clean latent, which is noised to 19
#             with fresh noise (Lf), and Lr targets the clean latent.
CLEAN_END_MODES = ("jump", "renoise")


def preservation_ends(boundaries: Boundaries, segment: torch.Tensor, clean_end: str = "jump"
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hi, lo, start) of the preservation losses: with "jump" the clean end lo = 0 becomes the encoder's start."""
    if clean_end not in CLEAN_END_MODES:
        raise ValueError(f"method.preservation_clean_end: expected one of {CLEAN_END_MODES}, got {clean_end!r}")
    hi, lo, start = segment_ends(boundaries, segment)
    return (hi, start, start) if clean_end == "jump" else (hi, lo, start)


def forward_preservation_term(bundle: ModelBundle, x0, context, segment, noise, start_noise,
                              boundaries: Boundaries, huber_c: float, clean_end: str = "jump",
                              decoder: ModelBundle | None = None) -> torch.Tensor:
    """Lf = d(f_fwd(stopgrad f_rev(x_hi)), x_hi): decode one segment, encode it back (unguided).

    ``start_noise`` is used only by ``clean_end="renoise"`` (see `CLEAN_END_MODES`). ``decoder``: the
    reverse model as its own bundle (`frozen_decoder`), else ``bundle``'s reverse adapter.
    """
    hi, lo, start = (v.to(x0.device) for v in preservation_ends(boundaries, segment, clean_end))
    acp = bundle.alphas_cumprod
    x_hi = add_noise(acp, x0, noise, hi).to(x0.dtype)
    with torch.no_grad():
        x_lo = (consistency_jump(bundle, REVERSE, x_hi, hi, lo, context, 0.0) if decoder is None
                else consistency_jump(decoder, None, x_hi, hi, lo, context, 0.0))
        clean = (lo == 0).reshape(-1, *([1] * (x0.dim() - 1)))
        x_start = torch.where(clean, add_noise(acp, x_lo, start_noise, start).to(x0.dtype), x_lo)
    prediction = consistency_jump(bundle, FORWARD, x_start, start, hi, context, 0.0)
    return forward_preservation_loss(prediction, x_hi, huber_c)


def reverse_preservation_term(bundle: ModelBundle, x0, context, segment, noise, start_noise,
                              boundaries: Boundaries, huber_c: float, clean_end: str = "jump") -> torch.Tensor:
    """Lr = d(f_rev(stopgrad f_fwd(x_lo)), x_lo): encode one segment, decode it back (unguided).

    ``start_noise`` is used only by ``clean_end="renoise"`` (see `CLEAN_END_MODES`).
    """
    hi, lo, start = (v.to(x0.device) for v in preservation_ends(boundaries, segment, clean_end))
    acp = bundle.alphas_cumprod
    clean = (lo == 0).reshape(-1, *([1] * (x0.dim() - 1)))
    x_lo = torch.where(clean, x0, add_noise(acp, x0, noise, lo).to(x0.dtype))
    with torch.no_grad():
        x_start = torch.where(clean, add_noise(acp, x0, start_noise, start).to(x0.dtype), x_lo)
        x_hi = consistency_jump(bundle, FORWARD, x_start, start, hi, context, 0.0)
    prediction = consistency_jump(bundle, REVERSE, x_hi, hi, lo, context, 0.0)
    return reverse_preservation_loss(prediction, x_lo, huber_c)


def cycle_term(bundle: ModelBundle, lpips: PatchLPIPS, x0, context, boundaries: Boundaries,
               generator: torch.Generator | None = None, decoder: ModelBundle | None = None) -> torch.Tensor:
    """LPIPS(decode(f_rev^m(f_fwd^m(x0))), decode(x0)): the encoder from t = 0 with gradients, the decoder unguided.

    ``decoder``: the reverse model as its own bundle (`frozen_decoder`), else ``bundle``'s reverse adapter.
    """
    from_zero = Boundaries(boundaries.reverse_timesteps, (0, *boundaries.forward_timesteps[1:]),
                           boundaries.num_train_timesteps)
    encoded = consistency_encode(bundle, x0, context, from_zero, generator).latents
    if decoder is None:
        decoded = consistency_decode(bundle, encoded, context, from_zero, guidance=0.0).latents
    else:
        decoded = consistency_decode(decoder, encoded, context, from_zero, guidance=0.0, adapter=None).latents
    with torch.no_grad():
        target_images = bundle.decode_latents(x0)
    return cycle_loss(lpips, bundle.decode_latents(decoded), target_images)


# --- the objectives -------------------------------------------------------------------------

def _uniform(n: int, count: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randint(0, n, (count,), generator=generator)


def _noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator).to(like.device, like.dtype)


class CFGDistillObjective(torch.nn.Module):
    """Guidance distillation: the w-embedded student learns the teacher's two-pass CFG prediction.

    ``teacher_unet`` is a frozen copy of the base UNet for a full fine-tune; None when the
    student trains a LoRA adapter (`GUIDANCE_ADAPTER`), whose disabled state is the teacher.
    """

    def __init__(self, bundle: ModelBundle, uncond_context: torch.Tensor, guidance_scales: list[float],
                 teacher_unet: torch.nn.Module | None = None):
        super().__init__()
        self.bundle, self.unet, self.teacher = bundle, bundle.unet, teacher_unet
        self.register_buffer("uncond", uncond_context[:1].detach(), persistent=False)
        self.guidance_scales = torch.tensor(guidance_scales, dtype=torch.float32)

    def teacher_eps(self, x, t, context):
        if self.teacher is not None:
            return self.teacher(x, t, **self.bundle.unet_kwargs(context)).sample
        with self.bundle.adapter(None):  # no timestep_cond: the w-embedding is not part of the teacher
            return self.unet(x, t, timestep_cond=None, **self.bundle.unet_kwargs(context)).sample

    def term_names(self) -> list[str]:
        return ["cfg_distill"]

    def forward(self, latents, context, generator: torch.Generator | None = None,
                term: str | None = None) -> dict[str, torch.Tensor]:
        if term not in (None, "cfg_distill"):
            raise ValueError(f"unknown loss term {term!r}; expected 'cfg_distill'")
        b, num_t = latents.shape[0], len(self.bundle.alphas_cumprod)
        t = _uniform(num_t, b, generator).to(latents.device)
        w = self.guidance_scales[_uniform(len(self.guidance_scales), b, generator)]
        x_t = add_noise(self.bundle.alphas_cumprod, latents, _noise(latents, generator), t).to(latents.dtype)
        with torch.no_grad():
            # SDXL: zero hidden states with the sample's pooled embedding, as the official iCD-XL training
            uncond = self.bundle.unconditional_like(context, self.uncond, pooled_from_context=True)
            eps_c, eps_u = self.teacher_eps(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                            torch.cat([context, uncond])).chunk(2)
        with self.bundle.adapter(GUIDANCE_ADAPTER if self.teacher is None else None):
            student = self.bundle.eps(x_t, t, context, w)
        loss = guidance_distillation_term(student, eps_c, eps_u, w.to(latents.device))
        return {"loss": loss, "cfg_distill": loss.detach()}


class ICDObjective(torch.nn.Module):
    """Both consistency models at once: reverse CD (guided) + forward CD (unguided) + lf Lf + lr Lr.

    ``targets`` maps each adapter to the adapter of its consistency target (`icd.train.target`);
    by default each is its own target.
    """

    def __init__(self, bundle: ModelBundle, boundaries: Boundaries, method, targets: dict[str, str] | None = None):
        super().__init__()
        self.bundle, self.unet, self.boundaries, self.method = bundle, bundle.unet, boundaries, method
        self.targets = {FORWARD: FORWARD, REVERSE: REVERSE, **(targets or {})}
        self.guidance_scales = torch.tensor(reverse_guidance_scales(method), dtype=torch.float32)
        grid = teacher_grid(method.num_train_timesteps, method.teacher_step)
        self.reverse_grid = grid[grid > 0]
        self.forward_grid = grid[(grid < method.num_train_timesteps - 1) & (grid >= boundaries.forward_timesteps[0])]
        if method.lambda_forward or method.lambda_reverse:
            check_mirrored(boundaries)

    def consistency_terms(self, x0, context, generator) -> dict[str, torch.Tensor]:
        b, m = x0.shape[0], self.method
        t_rev = self.reverse_grid[_uniform(len(self.reverse_grid), b, generator)].to(x0.device)
        w = self.guidance_scales[_uniform(len(self.guidance_scales), b, generator)]
        t_fwd = self.forward_grid[_uniform(len(self.forward_grid), b, generator)].to(x0.device)
        return {
            "cd_reverse": reverse_consistency_term(self.bundle, x0, context, t_rev, w, _noise(x0, generator),
                                                   self.boundaries, m.teacher_step, m.huber_c, self.targets[REVERSE],
                                                   m.consistency_space),
            "cd_forward": forward_consistency_term(self.bundle, x0, context, t_fwd, _noise(x0, generator),
                                                   self.boundaries, m.teacher_step, m.huber_c, self.targets[FORWARD],
                                                   m.consistency_space),
        }

    def preservation_term(self, which: str, x0, context, generator) -> torch.Tensor:
        segment = _uniform(len(self.boundaries.reverse_timesteps), x0.shape[0], generator)
        term = forward_preservation_term if which == "forward" else reverse_preservation_term
        return term(self.bundle, x0, context, segment, _noise(x0, generator), _noise(x0, generator),
                    self.boundaries, self.method.huber_c, self.method.preservation_clean_end)

    def term_names(self) -> list[str]:
        """The loss terms in the official code's order of steps (`train.<stage>.step_per_term`)."""
        names = ["cd_reverse", "cd_forward"]
        if self.method.lambda_forward:
            names.append("preservation_forward")
        if self.method.lambda_reverse:
            names.append("preservation_reverse")
        return names

    def single_term(self, name: str, x0, context, generator) -> tuple[float, torch.Tensor]:
        """(coefficient, value) of one loss term, with its own draws."""
        b, m = x0.shape[0], self.method
        if name == "cd_reverse":
            t = self.reverse_grid[_uniform(len(self.reverse_grid), b, generator)].to(x0.device)
            w = self.guidance_scales[_uniform(len(self.guidance_scales), b, generator)]
            return 1.0, reverse_consistency_term(self.bundle, x0, context, t, w, _noise(x0, generator),
                                                 self.boundaries, m.teacher_step, m.huber_c, self.targets[REVERSE],
                                                 m.consistency_space)
        if name == "cd_forward":
            t = self.forward_grid[_uniform(len(self.forward_grid), b, generator)].to(x0.device)
            return 1.0, forward_consistency_term(self.bundle, x0, context, t, _noise(x0, generator),
                                                 self.boundaries, m.teacher_step, m.huber_c, self.targets[FORWARD],
                                                 m.consistency_space)
        if name in ("preservation_forward", "preservation_reverse"):
            which = name.removeprefix("preservation_")
            return getattr(m, f"lambda_{which}"), self.preservation_term(which, x0, context, generator)
        raise ValueError(f"unknown loss term {name!r}; expected one of {self.term_names()}")

    def term_loss(self, term: str, latents, context, generator) -> dict[str, torch.Tensor]:
        """One term alone as a loss (its coefficient applied), for a per-term optimizer step."""
        weight, value = self.single_term(term, latents, context, generator)
        return {"loss": weight * value, term: value.detach()}

    def forward(self, latents, context, generator: torch.Generator | None = None,
                term: str | None = None) -> dict[str, torch.Tensor]:
        """The summed loss, or with ``term`` that one term alone (`term_loss`)."""
        if term is not None:
            return self.term_loss(term, latents, context, generator)
        parts = self.consistency_terms(latents, context, generator)
        loss = parts["cd_reverse"] + parts["cd_forward"]
        if self.method.lambda_forward:
            parts["preservation_forward"] = self.preservation_term("forward", latents, context, generator)
            loss = loss + self.method.lambda_forward * parts["preservation_forward"]
        if self.method.lambda_reverse:
            parts["preservation_reverse"] = self.preservation_term("reverse", latents, context, generator)
            loss = loss + self.method.lambda_reverse * parts["preservation_reverse"]
        return {"loss": loss, **{k: v.detach() for k, v in parts.items()}}


def frozen_decoder(bundle: ModelBundle) -> ModelBundle:
    """The reverse model as a bundle of its own: a UNet copy with the reverse LoRA fused into its weights.

    For stages that keep the reverse model frozen (cycle): its passes then run no LoRA branches,
    while gradients still flow through it to its input. Costs one more UNet in memory.
    """
    from icd.models.fused import fused_unet

    return dataclasses.replace(bundle, unet=fused_unet(bundle.unet, REVERSE))


class CycleObjective(ICDObjective):
    """The forward adapter only: cycle LPIPS (coefficient 1) + its consistency loss + lf Lf.

    The reverse model is frozen here, so its passes (the cycle's decode, Lf's stop-gradient decode)
    run on `frozen_decoder`'s fused copy: equal to the adapter's passes up to fp32 rounding, without
    the LoRA branches (5 of the 13 UNet passes of a step with Lf).
    """

    def __init__(self, bundle: ModelBundle, boundaries: Boundaries, method, lpips: PatchLPIPS,
                 targets: dict[str, str] | None = None, fuse_decoder: bool = True):
        super().__init__(bundle, boundaries, method, targets)
        self.vae, self.lpips = bundle.vae, lpips
        self.decoder = frozen_decoder(bundle) if fuse_decoder else None

    def preservation_term(self, which: str, x0, context, generator) -> torch.Tensor:
        if which != "forward":
            raise ValueError("the cycle stage trains the forward model only: Lr does not apply")
        segment = _uniform(len(self.boundaries.reverse_timesteps), x0.shape[0], generator)
        return forward_preservation_term(self.bundle, x0, context, segment, _noise(x0, generator),
                                         _noise(x0, generator), self.boundaries, self.method.huber_c,
                                         self.method.preservation_clean_end, self.decoder)

    def term_names(self) -> list[str]:
        return ["cycle", "cd_forward", *(["preservation_forward"] if self.method.lambda_forward else [])]

    def single_term(self, name: str, x0, context, generator) -> tuple[float, torch.Tensor]:
        if name == "cycle":
            return 1.0, cycle_term(self.bundle, self.lpips, x0, context, self.boundaries, generator, self.decoder)
        if name == "preservation_reverse":
            raise ValueError("the cycle stage trains the forward model only: Lr does not apply")
        return super().single_term(name, x0, context, generator)

    def forward(self, latents, context, generator: torch.Generator | None = None,
                term: str | None = None) -> dict[str, torch.Tensor]:
        if term is not None:
            return self.term_loss(term, latents, context, generator)
        b, m = latents.shape[0], self.method
        t_fwd = self.forward_grid[_uniform(len(self.forward_grid), b, generator)].to(latents.device)
        parts = {
            "cycle": cycle_term(self.bundle, self.lpips, latents, context, self.boundaries, generator, self.decoder),
            "cd_forward": forward_consistency_term(self.bundle, latents, context, t_fwd, _noise(latents, generator),
                                                   self.boundaries, m.teacher_step, m.huber_c, self.targets[FORWARD],
                                                   m.consistency_space),
        }
        loss = parts["cycle"] + parts["cd_forward"]
        if m.lambda_forward:
            parts["preservation_forward"] = self.preservation_term("forward", latents, context, generator)
            loss = loss + m.lambda_forward * parts["preservation_forward"]
        return {"loss": loss, **{k: v.detach() for k, v in parts.items()}}

