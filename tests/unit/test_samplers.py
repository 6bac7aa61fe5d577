"""Samplers against exact solutions for Gaussian data, NFE counting, and the real tiny UNet."""

from types import SimpleNamespace

import pytest
import torch
from diffusers.configuration_utils import FrozenDict

from icd.diffusion import samplers
from icd.diffusion.boundaries import Boundaries
from icd.diffusion.schedule import alpha_sigma, scaled_linear_alphas_cumprod, target_alpha_sigma
from icd.models.adapters import add_adapters
from icd.models.bundle import ModelBundle
from icd.models.toy import tiny_bundle, tiny_sdxl_bundle

ACP = scaled_linear_alphas_cumprod()
MU, STD = 0.3, 0.7  # the data: x0 ~ N(MU, STD^2 I)
DEFAULT = Boundaries((999, 779, 519, 259), (19, 259, 519, 779))
THREE_STEP = Boundaries((999, 699, 339), (19, 339, 699))


def ode_map(x, t, s):
    """The exact probability-flow ODE map x_t -> x_s for Gaussian data (s <= 0: the clean sample)."""
    a_t, s_t = alpha_sigma(ACP, t)
    a_s, s_s = target_alpha_sigma(ACP, s)
    z = (x - a_t * MU) / torch.sqrt(a_t ** 2 * STD ** 2 + s_t ** 2)
    return a_s * MU + torch.sqrt(a_s ** 2 * STD ** 2 + s_s ** 2) * z


class GaussianUNet(torch.nn.Module):
    """A stand-in UNet with a closed-form output, so samplers can be checked exactly.

    mode="optimal": the MMSE epsilon, sigma_t (x_t - alpha_t mu) / (alpha_t^2 std^2 + sigma_t^2).
    mode="consistency": the epsilon whose DDIM jump to the boundary lands on the exact ODE solution.
    """

    def __init__(self, mode="optimal", boundary_of=None):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.config = FrozenDict(time_cond_proj_dim=None, sample_size=8, in_channels=4)
        self.mode, self.boundary_of = mode, boundary_of

    def forward(self, x, t, encoder_hidden_states=None, timestep_cond=None):
        t = int(t[0])
        a_t, s_t = alpha_sigma(ACP, t)
        if self.mode == "optimal":
            eps = s_t * (x - a_t * MU) / (a_t ** 2 * STD ** 2 + s_t ** 2)
        else:
            s = self.boundary_of(t)
            a_s, s_s = target_alpha_sigma(ACP, s)
            eps = (ode_map(x, t, s) - (a_s / a_t) * x) / (s_s - a_s * s_t / a_t)
        return SimpleNamespace(sample=eps)


def gaussian_bundle(unet):
    return ModelBundle(unet=unet, vae=None, text_encoder=None, tokenizer=None, alphas_cumprod=ACP)


def data(n=4):
    return MU + STD * torch.randn(n, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_ddim_1000_inversion_reconstructs_gaussian_data():
    bundle = gaussian_bundle(GaussianUNet("optimal"))
    x0 = data()
    inverted = samplers.ddim_invert_latents(bundle, x0, None, num_steps=1000)
    back = samplers.ddim_sample(bundle, inverted.latents, None, num_steps=1000)
    assert (back.latents - x0).pow(2).mean().sqrt() < 1e-3
    assert inverted.nfe == back.nfe == 1000
    # The inverted latent is where the exact ODE takes x0 (taken at abar_0, as SD's DDIM does).
    assert (inverted.latents - ode_map(x0, 0, 999)).pow(2).mean().sqrt() < 3e-3
    # First-order solver: 20x more steps, ~20x smaller error.
    coarse = samplers.ddim_sample(bundle, samplers.ddim_invert_latents(bundle, x0, None, 50).latents, None, 50)
    assert (coarse.latents - x0).pow(2).mean().sqrt() > 10 * (back.latents - x0).pow(2).mean().sqrt()


def test_ddim_sample_equals_the_diffusers_scheduler_loop():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(20)
    unet = GaussianUNet("optimal")
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = x.clone()
    for t in scheduler.timesteps:
        expected = scheduler.step(unet(expected, t.reshape(1)).sample, t, expected).prev_sample
    assert scheduler.timesteps.tolist() == samplers.ddim_timesteps(20)
    ours = samplers.ddim_sample(gaussian_bundle(unet), x, None, 20).latents
    assert torch.allclose(ours, expected, atol=1e-6)


@pytest.mark.parametrize("boundaries", [DEFAULT, THREE_STEP, Boundaries((999, 779, 519, 259), (0, 259, 519, 779))],
                         ids=["4-step", "3-step", "from-t0"])
def test_multi_boundary_samplers_driven_by_the_exact_ode_are_exact(boundaries):
    fwd_of = lambda t: boundaries.forward_boundary(torch.tensor([t]))[0].item()
    rev_of = lambda t: boundaries.reverse_boundary(torch.tensor([t]))[0].item()
    encoder = gaussian_bundle(GaussianUNet("consistency", fwd_of))
    decoder = gaussian_bundle(GaussianUNet("consistency", rev_of))
    x0 = data()
    g = torch.Generator().manual_seed(5)
    inverted = samplers.consistency_encode(encoder, x0, None, boundaries, generator=g, adapter=None)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5)).double()  # the sampler's draw
    t0 = boundaries.forward_timesteps[0]
    x_t0 = alpha_sigma(ACP, t0)[0] * x0 + alpha_sigma(ACP, t0)[1] * noise
    assert torch.allclose(inverted.latents, ode_map(x_t0, t0, 999), atol=1e-8)
    decoded = samplers.consistency_decode(decoder, inverted.latents, None, boundaries, adapter=None)
    assert torch.allclose(decoded.latents, ode_map(x_t0, t0, 0), atol=1e-8)
    # x_t0 is x0 plus sigma_19 noise: the round trip lands within that noise of the input.
    assert (decoded.latents - x0).pow(2).mean().sqrt() < 0.2
    assert inverted.nfe == len(boundaries.forward_timesteps) and decoded.nfe == len(boundaries.reverse_timesteps)


def test_ddim_generate_with_a_plain_teacher_costs_two_passes_per_guided_step():
    bundle = gaussian_bundle(GaussianUNet("optimal"))
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    out = samplers.ddim_sample(bundle, x, torch.zeros(2, 1, 1, dtype=torch.float64), 10, guidance=7.0, tau=0.7,
                               uncond=torch.zeros(2, 1, 1, dtype=torch.float64))
    unguided = sum(1 for t in samplers.ddim_timesteps(10) if t / 1000 > 0.7)
    assert out.nfe == unguided + 2 * (10 - unguided)


def test_timestep_lists_are_not_modified():
    steps = [999, 779, 519, 259]
    b = Boundaries(tuple(steps), (19, 259, 519, 779))
    bundle = gaussian_bundle(GaussianUNet("consistency", lambda t: b.reverse_boundary(torch.tensor([t]))[0].item()))
    samplers.consistency_decode(bundle, data(), None, b, adapter=None)
    assert steps == [999, 779, 519, 259] and b.reverse_timesteps == (999, 779, 519, 259)


# --- the real (tiny) UNet with forward / reverse adapters ----------------------------------

@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def tiny(request):
    bundle = tiny_bundle(guidance_dim=16) if request.param == "sd15" else tiny_sdxl_bundle(guidance_dim=16)
    add_adapters(bundle.unet, 4, 4, ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj"])
    with torch.no_grad():  # make the adapters non-trivial, so they change outputs
        for name, p in bundle.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return bundle


def count_unet_calls(bundle):
    calls = []
    handle = bundle.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    return calls, handle


@pytest.mark.parametrize("boundaries, expected", [(DEFAULT, 8), (Boundaries((999, 779, 519, 259), (19, 339, 699)), 7)])
def test_edit_costs_one_unet_pass_per_step(tiny, boundaries, expected):
    calls, handle = count_unet_calls(tiny)
    try:
        images = torch.rand(3, 3, 32, 32) * 2 - 1
        out = samplers.edit(tiny, ["a red circle on a blue background"] * 3, ["a red star on a blue background"] * 3,
                            boundaries, images=images, guidance=7.0, tau=0.8, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert len(calls) == out.nfe == expected
    assert out.images.shape == (3, 3, 32, 32)


def test_different_guidance_per_sample_in_one_batch(tiny):
    x = torch.randn(2, 4, 8, 8)
    context = tiny.encode_prompts(["a red circle on a blue background"] * 2)
    with tiny.adapter("icd_reverse"):
        both = tiny.eps(x, 779, context, torch.tensor([0.0, 7.0]))
        first = tiny.eps(x[:1], 779, context[:1], 0.0)
        second = tiny.eps(x[1:], 779, context[1:], 7.0)
    assert torch.allclose(both, torch.cat([first, second]), atol=1e-5)


def test_adapter_context_restores_state_also_after_an_exception(tiny):
    with tiny.adapter("icd_forward"):
        assert tiny._active_adapter() == "icd_forward"
    before = tiny._active_adapter()
    with pytest.raises(RuntimeError):
        with tiny.adapter(None):
            assert tiny._active_adapter() is None
            raise RuntimeError("boom")
    assert tiny._active_adapter() == before
    with pytest.raises(KeyError, match="not on the UNet"):
        with tiny.adapter("forward"):
            pass


def test_generate_and_reconstruct_shapes_and_seeds(tiny):
    prompts = ["a blue square on a white background", "a red star on a black background"]
    a = samplers.generate(tiny, prompts, DEFAULT, guidance=7.0, tau=0.8, generator=torch.Generator().manual_seed(3))
    b = samplers.generate(tiny, prompts, DEFAULT, guidance=7.0, tau=0.8, generator=torch.Generator().manual_seed(3))
    assert a.nfe == 4 and torch.equal(a.images, b.images) and a.images.shape == (2, 3, 32, 32)
    r = samplers.reconstruct(tiny, prompts, DEFAULT, images=a.images.clamp(-1, 1), generator=torch.Generator().manual_seed(0))
    assert r.nfe == 8 and torch.isfinite(r.images).all()


def test_per_sample_guidance_in_one_batch_equals_separate_calls():
    from icd.diffusion.guidance import batched_guidance

    bundle = tiny_bundle(seed=2, guidance_dim=16)
    add_adapters(bundle.unet, 4, 4, ["to_q", "to_v", "conv1"])
    g = torch.Generator().manual_seed(0)
    x0, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():  # give the w-embedding an effect
        bundle.unet.time_embedding.cond_proj.weight.normal_(0, 0.5, generator=g)
    ws = batched_guidance(DEFAULT.reverse_timesteps, [7.0, [0.0, 3.0, 5.0, 9.0]], [0.8, None])
    assert ws[:, 0].tolist() == [0.0, 7.0, 7.0, 7.0] and ws[:, 1].tolist() == [0.0, 3.0, 5.0, 9.0]
    with torch.no_grad():
        both = samplers.consistency_decode(bundle, x0, context, DEFAULT, ws).latents
        first = samplers.consistency_decode(bundle, x0[:1], context[:1], DEFAULT, 7.0, tau=0.8).latents
        second = samplers.consistency_decode(bundle, x0[1:], context[1:], DEFAULT, [0.0, 3.0, 5.0, 9.0]).latents
    assert torch.allclose(both, torch.cat([first, second]), atol=1e-5)
    assert not torch.allclose(first, samplers.consistency_decode(bundle, x0[:1], context[:1], DEFAULT, 0.0).latents)
    with pytest.raises(ValueError, match="expected \\(steps, batch\\)"):
        samplers.consistency_decode(bundle, x0, context, DEFAULT, ws[:3])


def test_step_loops_use_inputs_prepared_before_the_loop(tiny, monkeypatch):
    """The consistency samplers build every step's t, w-embedding and jump coefficients up front
    (on a GPU no host-to-device copy per step), and those equal what each step would compute."""
    plans, seen = [], []
    real_plan = samplers.step_plan

    def recording_plan(*args):
        plans.append(real_plan(*args))
        return plans[-1]

    monkeypatch.setattr(samplers, "step_plan", recording_plan)
    unet_forward = tiny.unet.forward

    def unet(x, t, encoder_hidden_states=None, timestep_cond=None, **kwargs):
        seen.append((t, timestep_cond))
        return unet_forward(x, t, encoder_hidden_states=encoder_hidden_states, timestep_cond=timestep_cond, **kwargs)

    monkeypatch.setattr(tiny.unet, "forward", unet)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = samplers.edit(tiny, ["a red circle"] * 2, ["a blue circle"] * 2, DEFAULT, images=images, guidance=7.0,
                        tau=0.8, generator=torch.Generator().manual_seed(1))
    planned = [(t, cond) for plan in plans for t, cond, _ in plan]
    assert len(planned) == len(seen) == out.nfe == 8
    assert all(t is pt and c is pc for (t, c), (pt, pc) in zip(seen, planned))
    for plan, timesteps, targets in ((plans[0], DEFAULT.forward_timesteps, DEFAULT.forward_targets),
                                     (plans[1], DEFAULT.reverse_timesteps, DEFAULT.reverse_targets)):
        for (t, cond, jump), step, target in zip(plan, timesteps, targets):
            assert t.tolist() == [step, step]
            expected = (*alpha_sigma(tiny.alphas_cumprod, step), *target_alpha_sigma(tiny.alphas_cumprod, target))
            assert all(torch.equal(c, e.float()) for c, e in zip(jump, expected))
    w_999, w_259 = plans[1][0][1], plans[1][-1][1]  # dynamic CFG at tau 0.8: unguided at 999, w = 7 at 259
    assert torch.equal(w_999, tiny.guidance_cond(0.0, 2)) and torch.equal(w_259, tiny.guidance_cond(7.0, 2))
