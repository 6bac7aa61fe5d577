"""No stage may leave its model worse than it found it: each stage's output measured against its input.

    cfg_distill  the student's one pass at code w against the teacher's two-pass CFG: the epsilon
                 MSE to the CFG target (before: the input's one pass, i.e. not distilling at all)
                 and caption accuracy of DDIM generation (before: the teacher with two passes)
    icd          reconstruction PSNR and 4-step generation caption accuracy, against the same
                 UNet with zero-initialised adapters (the teacher's own DDIM jumps between boundaries)
    cycle        reconstruction PSNR against its icd input

The measurements (`stage_quality`) run the samplers on a small held-out set; the decision
(`check_gates`) is a pure function of the two measurements and the gates in
``tracking.stage_gates``, so a test can drive it with any numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from icd.config import STAGE_METRICS
from icd.diffusion import samplers
from icd.diffusion.boundaries import Boundaries
from icd.diffusion.guidance import cfg_combine
from icd.diffusion.schedule import add_noise
from icd.models.bundle import ModelBundle

# metric -> whether a higher value is better
METRICS = {"psnr": True, "caption_accuracy": True, "eps_mse": False}
# DDIM steps of cfg_distill's generation probe (two passes per step for the teacher).
GUIDANCE_PROBE_STEPS = 25
# Where a measurement keeps the per-image 0/1 outcomes behind a fraction (caption_accuracy).
PER_IMAGE = "per_image"


class StageRegression(RuntimeError):
    """A stage made its model worse; the message names the stage, the metric and both values."""


@dataclass(frozen=True)
class GateResult:
    stage: str
    metric: str
    before: float
    after: float
    max_regression: float
    noise: float = 0.0  # standard error of (after - before); 0 where per-image outcomes are not kept
    noise_sigmas: float = 0.0

    @property
    def allowed(self) -> float:
        return self.max_regression + self.noise_sigmas * self.noise

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric]

    @property
    def regression(self) -> float:
        """How much worse ``after`` is than ``before`` (negative: better)."""
        return (self.before - self.after) if self.higher_is_better else (self.after - self.before)

    @property
    def passed(self) -> bool:
        return self.regression <= self.allowed + 1e-9

    def describe(self) -> str:
        direction = "higher" if self.higher_is_better else "lower"
        verdict = "ok" if self.passed else "WORSE"
        allowed = f"{self.max_regression:g}"
        if self.noise and self.noise_sigmas:
            allowed += f" + {self.noise_sigmas:g} x {self.noise:.3f} measurement noise"
        return (f"{self.stage}.{self.metric}: {self.after:.4g} after training against {self.before:.4g} before "
                f"({direction} is better, allowed loss {allowed}): {verdict}")


def paired_difference_se(before: Sequence[float], after: Sequence[float]) -> float:
    """Standard error of mean(after) - mean(before) over paired outcomes: sqrt(var(a_i - b_i) / n), var with n - 1."""
    if len(before) != len(after):
        raise ValueError(f"{len(before)} outcomes before but {len(after)} after: expected the same images")
    n = len(before)
    if n < 2:
        return 0.0
    diffs = [float(a) - float(b) for a, b in zip(after, before)]
    mean = sum(diffs) / n
    return math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)


def check_gates(stage: str, before: dict[str, float], after: dict[str, float], gates) -> list[GateResult]:
    """One result per gate of ``stage`` (``gates``: `icd.config.StageGate`s); a metric not measured is an error."""
    results = []
    for gate in gates:
        if gate.stage != stage:
            continue
        if gate.metric not in before or gate.metric not in after:
            raise KeyError(f"tracking.stage_gates: {stage}.{gate.metric} was not measured (caption_accuracy "
                           f"needs shapes-world captions); {stage} measures {', '.join(STAGE_METRICS[stage])}")
        outcomes = [side.get(PER_IMAGE, {}).get(gate.metric) for side in (before, after)]
        noise = paired_difference_se(*outcomes) if all(o is not None for o in outcomes) else 0.0
        results.append(GateResult(stage, gate.metric, float(before[gate.metric]), float(after[gate.metric]),
                                  gate.max_regression, noise, gate.noise_sigmas))
    return results


def refusal(results: list[GateResult]) -> str | None:
    """The message for the failed gates, or None when all passed."""
    failed = [r for r in results if not r.passed]
    if not failed:
        return None
    stage = failed[0].stage
    return (f"stage {stage} made the model worse, so nothing is registered: "
            + "; ".join(r.describe() for r in failed)
            + ". Its output is kept; change the training settings (or relax tracking.stage_gates) and resubmit.")


# --- measurements ---------------------------------------------------------------------------

@torch.no_grad()
def guidance_eps_mse(student: ModelBundle, teacher: ModelBundle, latents: torch.Tensor, context: torch.Tensor,
                     uncond: torch.Tensor, scales: list[float], seed: int = 0) -> float:
    """mean over t ~ U, w in scales of |student(x_t, t, c, w) - [eps_c + w (eps_c - eps_u)]|^2 (teacher two-pass).

    A student without a w-embedding answers with its one unguided pass: the error of not distilling.
    """
    generator = torch.Generator().manual_seed(seed)
    b = latents.shape[0]
    t = torch.randint(0, len(teacher.alphas_cumprod), (b,), generator=generator)
    w = torch.tensor(scales, dtype=torch.float32)[torch.randint(0, len(scales), (b,), generator=generator)]
    noise = torch.randn(latents.shape, generator=generator).to(latents.dtype)
    x_t = add_noise(teacher.alphas_cumprod, latents, noise, t).to(latents.dtype)
    uncond = teacher.unconditional_like(context, uncond, pooled_from_context=True)  # SDXL: as training does
    with teacher.adapter(None):
        eps_c, eps_u = teacher.eps(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([context, uncond])).chunk(2)
    target = cfg_combine(eps_c, eps_u, w.reshape(-1, 1, 1, 1))
    with student.adapter(None):
        prediction = student.eps(x_t, t, context, w if student.guidance_dim is not None else None)
    return float(((prediction - target) ** 2).mean())


@torch.no_grad()
def stage_quality(stage: str, bundle: ModelBundle, images: torch.Tensor, captions: list[str], editing,
                  boundaries: Boundaries | None = None, teacher: ModelBundle | None = None,
                  guidance_scales: list[float] | None = None, seed: int = 0) -> dict[str, float]:
    """The metrics of ``STAGE_METRICS[stage]`` for one model (``bundle``) on held-out images in [-1, 1].

    cfg_distill needs ``teacher`` (the base UNet, for the CFG target) and ``guidance_scales``; a
    bundle without a w-embedding is measured as the teacher itself (two-pass CFG generation).
    icd and cycle need ``boundaries``.
    """
    from icd.evaluation.reconstruction import consistency_reconstructor, reconstruction_metrics
    from icd.evaluation.report import caption_hits, is_shapes_world

    shapes = is_shapes_world(captions)  # caption accuracy is read from shapes-world pixels only

    def seeded():
        return torch.Generator().manual_seed(seed)

    if stage == "cfg_distill":
        context = bundle.encode_prompts(captions)
        latents = bundle.encode_images(images)
        eps_mse = guidance_eps_mse(bundle, teacher, latents, context, bundle.encode_prompts([""]),
                                   guidance_scales, seed)
        if not shapes:
            return {"eps_mse": eps_mse}
        hits = caption_hits(lambda prompts: samplers.ddim_generate(
            bundle, prompts, GUIDANCE_PROBE_STEPS, editing.guidance, generator=seeded()).images, captions)
        return {"eps_mse": eps_mse, **fraction("caption_accuracy", hits)}
    recon = reconstruction_metrics(bundle, images, captions, consistency_reconstructor(boundaries, seed=seed))
    metrics = {"psnr": recon["psnr"]}
    if shapes and "caption_accuracy" in STAGE_METRICS[stage]:
        metrics.update(fraction("caption_accuracy", caption_hits(lambda prompts: samplers.generate(
            bundle, prompts, boundaries, editing.guidance, editing.tau, generator=seeded()).images, captions)))
    return metrics


def fraction(metric: str, outcomes: list[bool]) -> dict:
    """{metric: mean, "per_image": {metric: [0/1, ...]}}: the value and what its noise is estimated from."""
    return {metric: float(sum(outcomes) / len(outcomes)) if outcomes else float("nan"),
            PER_IMAGE: {metric: [int(o) for o in outcomes]}}
