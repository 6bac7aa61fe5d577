"""Schedule, DDIM jump, boundaries and guidance against independent computations."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, LatentConsistencyModelPipeline

from icd.diffusion.boundaries import Boundaries, teacher_timestep
from icd.diffusion.guidance import cfg_combine, dynamic_guidance, guidance_embedding, guidance_schedule
from icd.diffusion.schedule import (
    CLEAN, add_noise, alpha_sigma, ddim_jump_timesteps, jump_eps_gain, predict_x0, scaled_linear_alphas_cumprod,
    target_alpha_sigma,
)

ACP = scaled_linear_alphas_cumprod()


def sd_ddim(**overrides) -> DDIMScheduler:
    config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    config.update(overrides)
    return DDIMScheduler(**config)


def test_schedule_matches_diffusers_and_the_closed_form():
    assert torch.allclose(ACP.float(), sd_ddim().alphas_cumprod, atol=1e-6)
    betas = [(math.sqrt(0.00085) + i * (math.sqrt(0.012) - math.sqrt(0.00085)) / 999) ** 2 for i in range(1000)]
    assert ACP[999].item() == pytest.approx(math.prod(1 - b for b in betas), rel=1e-9)


def test_ddim_jump_equals_diffusers_step():
    scheduler = sd_ddim()
    scheduler.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    for t in scheduler.timesteps.tolist():
        prev = t - 20
        if prev < 0:
            continue
        eps = torch.randn(x.shape, generator=g)
        expected = scheduler.step(eps, t, x).prev_sample
        ours = ddim_jump_timesteps(ACP, x, eps, t, prev).float()
        assert torch.allclose(ours, expected, atol=1e-5), t
        x = expected


def test_last_step_to_clean_equals_diffusers_with_alpha_one():
    scheduler = sd_ddim(set_alpha_to_one=True)
    scheduler.set_timesteps(50)
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    expected = scheduler.step(eps, 1, x).prev_sample  # prev < 0 -> abar = 1
    assert torch.allclose(ddim_jump_timesteps(ACP, x, eps, 1, CLEAN).float(), expected, atol=1e-5)
    # As a jump target, boundary 0 is the clean sample too, i.e. the x0 prediction.
    assert torch.allclose(ddim_jump_timesteps(ACP, x, eps, 259, 0), predict_x0(x, eps, *alpha_sigma(ACP, 259)))


def test_forward_then_backward_jump_is_identity_and_t_equals_s_is_identity():
    x, eps = torch.randn(4, 4, 8, 8, dtype=torch.float64), torch.randn(4, 4, 8, 8, dtype=torch.float64)
    up = ddim_jump_timesteps(ACP, x, eps, 259, 519)
    back = ddim_jump_timesteps(ACP, up, eps, 519, 259)
    assert torch.allclose(back, x, atol=1e-10)
    assert torch.allclose(ddim_jump_timesteps(ACP, x, eps, 519, 519), x, atol=1e-12)


@pytest.mark.parametrize("t, s", [(999, 779), (259, 0), (19, 259), (779, 999)])
def test_jump_eps_gain_is_the_jumps_derivative_in_eps(t, s):
    g = torch.Generator().manual_seed(0)
    x, eps, delta = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, 4, 4, generator=g,
                                                                                         dtype=torch.float64), 1e-3
    slope = (ddim_jump_timesteps(ACP, x, eps + delta, t, s) - ddim_jump_timesteps(ACP, x, eps, t, s)) / delta
    torch.testing.assert_close(slope, torch.full_like(slope, float(jump_eps_gain(ACP, t, s))))
    assert (float(jump_eps_gain(ACP, t, s)) < 0) == (s < t)  # a decoder jump removes noise


def test_per_sample_timesteps_broadcast():
    x, eps = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t, s = torch.tensor([999, 259]), torch.tensor([779, 0])
    both = ddim_jump_timesteps(ACP, x, eps, t, s)
    for i in range(2):
        single = ddim_jump_timesteps(ACP, x[i:i + 1], eps[i:i + 1], int(t[i]), int(s[i]))
        assert torch.allclose(both[i:i + 1], single)


def test_add_noise_matches_diffusers_including_t0():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in (0, 19, 999):
        expected = sd_ddim().add_noise(x0, noise, torch.tensor([t, t]))
        # diffusers computes in float32: its rounding grows with |x| (up to 1.7e-6 over 200 draws)
        assert torch.allclose(add_noise(ACP, x0, noise, t).float(), expected, rtol=1e-5, atol=1e-6)
    assert alpha_sigma(ACP, 0)[1].item() == pytest.approx(0.0292, abs=1e-4)
    assert target_alpha_sigma(ACP, 0) == (1.0, 0.0)


@pytest.mark.parametrize("reverse, forward, rev_targets, fwd_targets", [
    ((999, 779, 519, 259), (19, 259, 519, 779), (779, 519, 259, 0), (259, 519, 779, 999)),
    ((999, 699, 339), (19, 339, 699), (699, 339, 0), (339, 699, 999)),
    ((999, 699, 499, 249), (19, 249, 499, 699), (699, 499, 249, 0), (249, 499, 699, 999)),
])
def test_boundary_sets(reverse, forward, rev_targets, fwd_targets):
    b = Boundaries(reverse, forward)
    assert b.reverse_targets == rev_targets and b.forward_targets == fwd_targets
    # Each segment start lands on its own target; every t inside a segment lands there too.
    assert b.reverse_boundary(torch.tensor(reverse)).tolist() == list(rev_targets)
    assert b.forward_boundary(torch.tensor(forward)).tolist() == list(fwd_targets)
    for start, target in zip(reverse, rev_targets):
        inside = torch.arange(target + 1, start + 1)
        assert (b.reverse_boundary(inside) == target).all()
    for start, target in zip(forward, fwd_targets):
        inside = torch.arange(start, target)
        assert (b.forward_boundary(inside) == target).all()


def test_bad_boundaries_are_rejected():
    with pytest.raises(ValueError, match="strictly decreasing"):
        Boundaries((259, 519), (19,))
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        Boundaries((1200, 259), (19,))


def test_teacher_timestep_clamps_to_the_boundary():
    t, s = torch.tensor([999, 279, 19]), torch.tensor([779, 259, 0])
    assert teacher_timestep(t, s, 20, "reverse").tolist() == [979, 259, 0]
    t, s = torch.tensor([19, 249, 979]), torch.tensor([259, 259, 999])
    assert teacher_timestep(t, s, 20, "forward").tolist() == [39, 259, 999]


def test_guidance_embedding_matches_the_lcm_pipeline():
    w = torch.tensor([0.0, 7.0, 19.0])
    reference = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=32)
    assert torch.allclose(guidance_embedding(w, 32), reference, atol=1e-6)
    assert guidance_embedding(torch.tensor([3.0]), 33).shape == (1, 33)


def test_cfg_combine_per_sample():
    c, u = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    out = cfg_combine(c, u, torch.tensor([0.0, 7.0, 19.0]))
    for i, w in enumerate((0.0, 7.0, 19.0)):
        assert torch.allclose(out[i], c[i] + w * (c[i] - u[i]))
    assert torch.allclose(cfg_combine(c, u, 0.0), c)


def test_dynamic_cfg():
    # tau = 0.8 with reverse steps [999, 779, 519, 259]: only the first step is unguided.
    assert guidance_schedule([999, 779, 519, 259], 7.0, 0.8) == [0.0, 7.0, 7.0, 7.0]
    assert guidance_schedule([999, 779, 519, 259], 7.0, 0.7) == [0.0, 0.0, 7.0, 7.0]
    assert guidance_schedule([999, 779, 519, 259], [0, 7, 11, 19]) == [0.0, 7.0, 11.0, 19.0]
    assert guidance_schedule([999, 779], 5.0) == [5.0, 5.0]
    assert dynamic_guidance(800, 7.0, 0.8) == 7.0 and dynamic_guidance(801, 7.0, 0.8) == 0.0
    with pytest.raises(ValueError, match="2 values for 4 steps"):
        guidance_schedule([999, 779, 519, 259], [0, 7])
