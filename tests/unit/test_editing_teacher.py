"""The teacher's DDIM edits (the baseline editor): switch and Prompt-to-Prompt, two-pass and embedded CFG."""

import pytest
import torch

from icd.diffusion import samplers
from icd.editing.p2p import P2POptions
from icd.editing.teacher import ddim_edit
from icd.models.toy import tiny_bundle, tiny_sdxl_bundle

SOURCES = ["a red circle on a blue background", "a green star on a white background"]
TARGETS = ["a yellow circle on a blue background", "a purple star on a white background"]


@pytest.fixture(scope="module", params=[("sd15", None), ("sd15", 16), ("sdxl", None)],
                ids=["two-pass-cfg", "embedded-cfg", "sdxl-two-pass-cfg"])
def bundle(request):
    architecture, guidance_dim = request.param
    build = tiny_bundle if architecture == "sd15" else tiny_sdxl_bundle
    return build(seed=3, guidance_dim=guidance_dim)


def images(n=2):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_p2p_without_injection_equals_the_prompt_switch(bundle):
    """Fractions 0: the controller is installed but changes nothing, so P2P's target rows are the switch edit."""
    kwargs = dict(images=images(), num_steps=10, guidance=7.0, tau=0.8)
    switch = ddim_edit(bundle, SOURCES, TARGETS, "switch", **kwargs)
    p2p = ddim_edit(bundle, SOURCES, TARGETS, "p2p", p2p=P2POptions(cross_fraction=0.0, self_fraction=0.0), **kwargs)
    assert torch.allclose(switch.latents, p2p.latents, atol=1e-4)
    # 10 inversion passes; 2 unguided decode steps (t/1000 > 0.8) and 8 guided ones, two passes each without an embedding
    assert switch.nfe == p2p.nfe == 10 + 2 + 8 * (2 if bundle.guidance_dim is None else 1)


def test_p2p_injection_changes_the_target_rows(bundle):
    kwargs = dict(images=images(), num_steps=10, guidance=7.0, tau=0.8)
    switch = ddim_edit(bundle, SOURCES, TARGETS, "switch", **kwargs)
    p2p = ddim_edit(bundle, SOURCES, TARGETS, "p2p", p2p=P2POptions(cross_fraction=1.0, self_fraction=1.0), **kwargs)
    assert (switch.latents - p2p.latents).abs().max() > 1e-3
    assert p2p.images.shape == (2, 3, 32, 32)


def test_switch_with_the_source_prompt_unguided_is_ddim_reconstruction(bundle):
    x = images()
    edited = ddim_edit(bundle, SOURCES, SOURCES, "switch", images=x, num_steps=10, guidance=0.0, decode=False)
    reference = samplers.ddim_reconstruct(bundle, SOURCES, 10, images=x, decode=False)
    assert torch.allclose(edited.latents, reference.latents, atol=1e-5) and edited.nfe == reference.nfe == 20


def test_unknown_mode_and_mismatched_prompts_are_refused(bundle):
    with pytest.raises(ValueError, match="mode must be one of"):
        ddim_edit(bundle, SOURCES, TARGETS, "guided", images=images())
    with pytest.raises(ValueError, match="2 source prompts but 1 target prompts"):
        ddim_edit(bundle, SOURCES, TARGETS[:1], images=images())
