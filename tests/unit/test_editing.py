"""Editing modes: switch and Prompt-to-Prompt through attention processors."""

import pytest
import torch

from icd.diffusion.boundaries import Boundaries
from icd.editing.attention import ControlledAttnProcessor, attention_control
from icd.editing.modes import edit
from icd.editing.p2p import P2POptions, PromptToPromptController, token_mapping
from icd.models.adapters import add_adapters
from icd.models.toy import tiny_bundle, tiny_sdxl_bundle

BOUNDARIES = Boundaries((999, 779, 519, 259), (19, 259, 519, 779))
SOURCES = ["a red circle on a blue background", "a green star on a white background",
           "a black square on a yellow background", "a white triangle on a red background"]


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def bundle(request):
    """Both architectures: SDXL's conditioning (two encoders, pooled embedding, size ids) takes the same paths."""
    b = tiny_bundle(seed=5, guidance_dim=16) if request.param == "sd15" else tiny_sdxl_bundle(seed=5, guidance_dim=16)
    add_adapters(b.unet, 4, 4, ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj"])
    with torch.no_grad():
        for name, p in b.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return b


@pytest.mark.parametrize("n", [1, 4])
def test_p2p_with_identical_prompts_equals_switch_reconstruction(bundle, n):
    images = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(n)) * 2 - 1
    prompts = SOURCES[:n]
    switch = edit(bundle, prompts, prompts, BOUNDARIES, "switch", images=images, guidance=0.0,
                  generator=torch.Generator().manual_seed(0))
    p2p = edit(bundle, prompts, prompts, BOUNDARIES, "p2p", images=images, guidance=0.0,
               generator=torch.Generator().manual_seed(0))
    assert switch.nfe == p2p.nfe == 8
    assert torch.allclose(switch.latents, p2p.latents, atol=1e-4)
    assert p2p.images.shape == (n, 3, 32, 32)


@pytest.mark.parametrize("n", [1, 4])
def test_p2p_edits_differ_from_switch_and_from_each_other(bundle, n):
    images = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(7)) * 2 - 1
    targets = [s.replace("background", "background at night") for s in SOURCES[:n]]
    kwargs = dict(images=images, guidance=7.0, tau=0.8)
    switch = edit(bundle, SOURCES[:n], targets, BOUNDARIES, "switch", generator=torch.Generator().manual_seed(0), **kwargs)
    p2p = edit(bundle, SOURCES[:n], targets, BOUNDARIES, "p2p", generator=torch.Generator().manual_seed(0), **kwargs)
    weighted = edit(bundle, SOURCES[:n], targets, BOUNDARIES, "p2p", generator=torch.Generator().manual_seed(0),
                    p2p=P2POptions(word_weights={"night": 3.0}), **kwargs)
    assert not torch.allclose(switch.latents, p2p.latents, atol=1e-3)
    assert not torch.allclose(p2p.latents, weighted.latents, atol=1e-3)


def test_processors_are_restored_after_a_call_and_after_an_exception(bundle):
    before = {name: type(p) for name, p in bundle.unet.attn_processors.items()}

    def failing(probs, is_cross, layer):
        raise RuntimeError("controller failed")

    x = torch.randn(2, 4, 8, 8)
    context = bundle.encode_prompts(SOURCES[:2])
    with pytest.raises(RuntimeError, match="controller failed"):
        with attention_control(bundle.unet, failing):
            assert all(isinstance(p, ControlledAttnProcessor) for p in bundle.unet.attn_processors.values())
            bundle.eps(x, 500, context)
    assert {name: type(p) for name, p in bundle.unet.attn_processors.items()} == before
    edit(bundle, SOURCES[:1], SOURCES[:1], BOUNDARIES, "p2p", images=torch.zeros(1, 3, 32, 32))
    assert {name: type(p) for name, p in bundle.unet.attn_processors.items()} == before


def test_identity_controller_reproduces_the_default_attention(bundle):
    x = torch.randn(2, 4, 8, 8)
    context = bundle.encode_prompts(SOURCES[:2])
    reference = bundle.eps(x, 500, context)
    with attention_control(bundle.unet, lambda probs, is_cross, layer: probs):
        assert torch.allclose(bundle.eps(x, 500, context), reference, atol=1e-5)


def test_token_mapping():
    assert token_mapping([1, 5, 9, 2], [1, 6, 9, 2], "replace").tolist() == [0, 1, 2, 3]
    assert token_mapping([1, 5, 9, 2], [1, 5, 7, 9, 2], "refine").tolist() == [0, 1, -1, 2, 3]
    assert token_mapping([1, 5, 9, 2], [1, 5, 7, 9, 2], "auto").tolist() == [0, 1, -1, 2, 3]
    with pytest.raises(ValueError, match="same number of tokens"):
        token_mapping([1, 2], [1, 2, 3], "replace")
    with pytest.raises(ValueError, match="cross_fraction"):
        P2POptions(cross_fraction=1.5)


def test_controller_against_a_direct_computation():
    pairs, heads, queries, tokens = 2, 3, 5, 4
    mappings = torch.tensor([[0, 1, 2, 3], [0, -1, 1, 2]])
    weights = torch.tensor([[1.0, 2.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.5]])
    controller = PromptToPromptController(P2POptions(cross_fraction=0.3, self_fraction=0.6), 4, mappings, weights)
    assert (controller.cross_steps, controller.self_steps) == (1, 2)  # 4 steps: step 0; steps 0-1
    probs = torch.rand(2 * pairs * heads, queries, tokens)
    view = probs.view(2, pairs, heads, queries, tokens)
    controller.step = 0
    out = controller(probs.clone(), True, "x").view(2, pairs, heads, queries, tokens)
    assert torch.equal(out[0], view[0])  # source rows untouched
    for p in range(pairs):
        for j in range(tokens):
            m = mappings[p, j].item()
            expected = (view[0, p, :, :, m] if m >= 0 else view[1, p, :, :, j]) * weights[p, j]
            assert torch.allclose(out[1, p, :, :, j], expected)
    controller.step = 3  # past both windows: only the re-weighting remains
    out = controller(probs.clone(), True, "x").view(2, pairs, heads, queries, tokens)
    assert torch.allclose(out[1], view[1] * weights[:, None, None, :])
    assert torch.equal(controller(probs.clone(), False, "x"), probs)  # self-attention no longer injected
    controller.step = 1  # inside the self-attention window, past the cross-attention one
    out = controller(probs.clone(), False, "x").view(2, pairs, heads, queries, tokens)
    assert torch.equal(out[1], view[0])
    out = controller(probs.clone(), True, "x").view(2, pairs, heads, queries, tokens)
    assert torch.allclose(out[1], view[1] * weights[:, None, None, :])


# --- guide-and-rescale --------------------------------------------------------------------

def test_rescale_guidance_bounds_the_norm_per_sample():
    from icd.editing.guided import rescale_guidance

    g = torch.stack([torch.full((4, 2, 2), 10.0), torch.full((4, 2, 2), 0.01)])
    d = torch.ones(2, 4, 2, 2)  # |d| = 4 for each sample
    out = rescale_guidance(g, d, (0.0, 1.0))
    norms = out.flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.tensor([4.0, 0.04]), atol=1e-5)  # capped at |d|; small ones kept
    out = rescale_guidance(g, d, (0.33, 3.0))
    assert torch.allclose(out.flatten(1).norm(dim=1), torch.tensor([12.0, 1.32]), atol=1e-4)
    assert torch.allclose(out[0] / out[0].norm(), g[0] / g[0].norm())  # direction unchanged


@pytest.mark.parametrize("n", [1, 4])
def test_guided_with_zero_weights_equals_switch(bundle, n):
    from icd.editing.guided import GuidedOptions

    images = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    targets = [s.replace("background", "background at night") for s in SOURCES[:n]]
    zero = GuidedOptions(feature_weights=(0, 0, 0, 0), self_attention_weights=(0, 0, 0, 0))
    switch = edit(bundle, SOURCES[:n], targets, BOUNDARIES, "switch", images=images, guidance=[0, 7, 11, 19],
                  generator=torch.Generator().manual_seed(0))
    guided = edit(bundle, SOURCES[:n], targets, BOUNDARIES, "guided", images=images, guidance=[0, 7, 11, 19],
                  generator=torch.Generator().manual_seed(0), guided=zero)
    assert guided.nfe == switch.nfe == 8
    assert torch.allclose(guided.latents, switch.latents, atol=1e-5)


@pytest.mark.parametrize("n", [1, 4])
def test_guided_steers_and_costs_three_passes_per_guided_step(bundle, n):
    images = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    targets = [s.replace("background", "background at night") for s in SOURCES[:n]]
    before = {name: type(p) for name, p in bundle.unet.attn_processors.items()}
    switch = edit(bundle, SOURCES[:n], targets, BOUNDARIES, "switch", images=images, guidance=[0, 7, 11, 19],
                  generator=torch.Generator().manual_seed(0))
    guided = edit(bundle, SOURCES[:n], targets, BOUNDARIES, "guided", images=images, guidance=[0, 7, 11, 19],
                  generator=torch.Generator().manual_seed(0))
    assert guided.nfe == 4 + 3 * 4 and guided.images.shape == (n, 3, 32, 32)
    assert not torch.allclose(guided.latents, switch.latents, atol=1e-4)
    assert {name: type(p) for name, p in bundle.unet.attn_processors.items()} == before
    # The energy's gradient is taken with respect to the latent only: no weight gradients pile up.
    assert all(p.grad is None for p in bundle.unet.parameters())


def test_options_from_the_config():
    from icd.config import load_config
    from icd.editing.guided import GuidedOptions

    editing = load_config("jobs/configs/sd15.yaml", ["editing.p2p_cross_fraction=0.5"]).editing
    assert P2POptions.from_config(editing).cross_fraction == 0.5
    guided = GuidedOptions.from_config(editing)
    assert guided.self_attention_weights == (0.0, 20000.0, 20000.0, 20000.0) and guided.bounds == (0.0, 1.0)
    with pytest.raises(ValueError, match="3 values for 4 reverse steps"):
        GuidedOptions(feature_weights=(1, 1, 1)).check(4)


def test_a_guided_edit_does_not_depend_on_the_batch_it_runs_in(bundle):
    """Served edits run one image at a time, benchmarks in batches: the energies must be per image, not a batch mean."""
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(6)) * 2 - 1
    targets = [s.replace("background", "background at night") for s in SOURCES]

    def run(mode, index):
        x0 = bundle.encode_images(images[index])
        return edit(bundle, [SOURCES[i] for i in index], [targets[i] for i in index], BOUNDARIES, mode, latents=x0,
                    guidance=[0, 7, 11, 19], generator=torch.Generator().manual_seed(0), decode=False).latents

    # switch is the control: image 0 gets the same inversion noise alone and first in the batch (a seeded
    # draw's prefix); image 2 does not, so only image 0 is compared.
    for mode in ("switch", "guided"):
        together = run(mode, [0, 1, 2, 3])
        assert torch.allclose(run(mode, [0]), together[:1], rtol=1e-3, atol=1e-3), mode
