"""Segment errors against the teacher ODE (icd.evaluation.ode_fidelity), recomputed by hand."""

import pytest
import torch

from icd.diffusion.boundaries import Boundaries
from icd.diffusion.schedule import add_noise, ddim_jump_timesteps
from icd.evaluation.ode_fidelity import segment_errors, teacher_ode_points
from icd.models.adapters import add_adapters
from icd.models.bundle import FORWARD, REVERSE
from icd.models.toy import tiny_bundle

TWO_SEGMENTS = Boundaries((999, 499), (19, 499))


@pytest.fixture(scope="module")
def adapted():
    bundle = tiny_bundle(seed=0, guidance_dim=16)
    add_adapters(bundle.unet, 4, 4, ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])  # zero-initialised B
    bundle.unet.eval()
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    return bundle, x0, noise, torch.randn(3, 77, 32, generator=g)


def teacher_step(bundle, x, context, t, s):
    with torch.no_grad(), bundle.adapter(None):
        return ddim_jump_timesteps(bundle.alphas_cumprod, x, bundle.eps(x, t, context, 0.0), t, s)


def test_points_are_the_teachers_ddim_steps_from_19(adapted):
    bundle, x0, noise, context = adapted
    with torch.no_grad():
        points = teacher_ode_points(bundle, x0, context, TWO_SEGMENTS, 240, noise)
    x = add_noise(bundle.alphas_cumprod, x0, noise, 19)
    expected = {0: x0, 19: x}
    for t, s in ((19, 259), (259, 499), (499, 739), (739, 979), (979, 999)):  # the last step shortened to 999
        x = teacher_step(bundle, x, context, t, s)
        expected[s] = x
    assert sorted(points) == [0, 19, 499, 999]
    for t in points:
        torch.testing.assert_close(points[t], expected[t])


def test_zero_adapters_with_one_teacher_step_per_segment_have_no_encoder_error(adapted):
    bundle, x0, noise, context = adapted
    # One teacher step spans each encoder segment (19 -> 509 -> 999): the untrained encoder's jump *is* the ODE.
    errors = segment_errors(bundle, x0, context, Boundaries((999, 509), (19, 509)), teacher_step=490, noise=noise)
    assert errors["encoder"] == pytest.approx([0.0, 0.0], abs=1e-10)
    assert errors["encoder_chain"] == pytest.approx(0.0, abs=1e-10)
    # Finer steps make the ODE differ from one jump, by what a direct computation gives.
    errors = segment_errors(bundle, x0, context, TWO_SEGMENTS, teacher_step=20, noise=noise)
    x = add_noise(bundle.alphas_cumprod, x0, noise, 19)
    x_19 = x
    for t in range(19, 499, 20):
        x = teacher_step(bundle, x, context, t, t + 20)
    one_jump = teacher_step(bundle, x_19, context, 19, 499)
    assert errors["encoder"][0] == pytest.approx(float(((one_jump - x) ** 2).mean()), rel=1e-5)
    assert errors["encoder"][0] > 1e-6


def test_decoder_errors_follow_the_reverse_adapter_and_end_on_the_clean_latent(adapted):
    bundle, x0, noise, context = adapted
    before = segment_errors(bundle, x0, context, TWO_SEGMENTS, 20, noise)
    with torch.no_grad():
        points = teacher_ode_points(bundle, x0, context, TWO_SEGMENTS, 20, noise)
        landed = teacher_step(bundle, points[499], context, 499, 0)
    assert before["decoder"][1] == pytest.approx(float(((landed - x0) ** 2).mean()), rel=1e-5)
    decoded = teacher_step(bundle, teacher_step(bundle, points[999], context, 999, 499), context, 499, 0)
    assert before["decoder_chain"] == pytest.approx(float(((decoded - x0) ** 2).mean()), rel=1e-5)
    lora_b = [p for n, p in bundle.unet.named_parameters() if f"lora_B.{REVERSE}" in n]
    try:
        with torch.no_grad():
            for p in lora_b:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        after = segment_errors(bundle, x0, context, TWO_SEGMENTS, 20, noise)
    finally:
        with torch.no_grad():
            for p in lora_b:
                p.zero_()
    assert after["decoder"] != pytest.approx(before["decoder"], rel=1e-3)
    assert after["decoder_chain"] != pytest.approx(before["decoder_chain"], rel=1e-3)
    assert after["encoder"] == pytest.approx(before["encoder"], rel=1e-6)  # the forward adapter is untouched


def test_boundaries_off_the_teachers_grid_are_refused(adapted):
    bundle, x0, noise, context = adapted
    with pytest.raises(ValueError, match=r"\[500\] are not on the teacher's grid 19"):
        teacher_ode_points(bundle, x0, context, Boundaries((999, 500), (19, 500)), 20, noise)
