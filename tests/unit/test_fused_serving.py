"""The served form of a pipeline: LoRA fused per direction, the prompt cache, inference mode."""

import pytest
import torch
from PIL import Image

from icd.config import EditingConfig, ServingConfig, load_config
from icd.diffusion.boundaries import Boundaries
from icd.editing.modes import edit
from icd.editing.pipeline import EditPipeline, decode_batch, invert_batch
from icd.models.adapters import add_adapters
from icd.models.bundle import FORWARD, REVERSE
from icd.models.fused import FusedBundle, fuse_directions, parameter_bytes
from icd.models.toy import tiny_bundle

BOUNDARIES = Boundaries((999, 779, 519, 259), (19, 259, 519, 779))
SOURCES = ["a red circle on a blue background", "a green star on a white background"]
TARGETS = ["a blue circle on a blue background", "a green star on a black background"]


def adapted():
    bundle = tiny_bundle(seed=5, guidance_dim=16)
    base_bytes = parameter_bytes(bundle.unet)
    add_adapters(bundle.unet, 4, 4, ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in bundle.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return bundle, base_bytes


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    """Equal within ``rel`` of the tensor's largest magnitude.

    One fused UNet pass matches to 1e-5 (fp32 rounding of W x + B A x against (W + B A) x); an
    edit chains 8 passes through DDIM jumps that divide by alpha_999 ~ 0.07, so its output is
    held to 1e-4.
    """
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


@pytest.fixture(scope="module")
def bundles():
    bundle, base_bytes = adapted()
    return bundle, fuse_directions(bundle), base_bytes


@pytest.mark.parametrize("mode", ["switch", "p2p", "guided"])
def test_fused_edits_equal_unfused_edits(bundles, mode):
    bundle, fused, _ = bundles
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    outs = [edit(b, SOURCES, TARGETS, BOUNDARIES, mode, images=images, guidance=7.0, tau=0.8,
                 generator=torch.Generator().manual_seed(0)) for b in (bundle, fused)]
    assert outs[0].nfe == outs[1].nfe
    assert close(outs[1].latents, outs[0].latents), (outs[1].latents - outs[0].latents).abs().max()
    assert close(outs[1].images, outs[0].images)


def test_one_fused_pass_equals_the_adapter_pass_to_fp32_rounding(bundles):
    bundle, fused, _ = bundles
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 4, 8, 8, generator=g), bundle.encode_prompts(SOURCES)
    with torch.no_grad():
        for name in (FORWARD, REVERSE):
            with bundle.adapter(name):
                expected = bundle.eps(x, 519, context, 7.0)
            with bundle.adapter(None):
                teacher = bundle.eps(x, 519, context, 7.0)
            with fused.adapter(name):
                got = fused.eps(x, 519, context, 7.0)
            assert close(got, expected, rel=1e-5)
            assert not close(teacher, expected, rel=1e-3)  # the adapters matter, so the test can fail


def test_fused_unets_are_plain_and_the_bundle_holds_two_of_them(bundles):
    from peft.tuners.tuners_utils import BaseTunerLayer

    bundle, fused, base_bytes = bundles
    assert isinstance(fused, FusedBundle) and fused.adapters == [FORWARD, REVERSE]
    for unet in fused.directions.values():
        assert not any(isinstance(m, BaseTunerLayer) for m in unet.modules())
        assert not getattr(unet, "peft_config", None)
        assert not any(p.requires_grad for p in unet.parameters())
        assert {type(a).__name__ for a in unet.attn_processors.values()} == {"AttnProcessor2_0"}  # SDPA
    assert fused.directions[FORWARD] is not fused.directions[REVERSE]
    assert parameter_bytes(*fused.directions.values()) == 2 * base_bytes
    with pytest.raises(KeyError, match="fused serving bundle"), fused.adapter(None):
        pass
    # the unfused bundle is untouched: still adapters, still both trainable
    assert bundle.adapters == [FORWARD, REVERSE]
    assert any(p.requires_grad for n, p in bundle.unet.named_parameters() if f".{FORWARD}." in n)


def test_serving_config_decides_the_served_form(bundles):
    bundle, _, _ = bundles
    pipeline = EditPipeline(bundle, BOUNDARIES, EditingConfig(), 32)
    served = pipeline.for_serving(ServingConfig())
    assert isinstance(served.bundle, FusedBundle) and served.bundle.prompt_cache_size == 256
    assert served.memory()["unet"] == parameter_bytes(*served.bundle.directions.values())
    plain = pipeline.for_serving(ServingConfig(fuse_adapters=False, prompt_cache_size=0))
    assert plain.bundle is bundle and not isinstance(plain.bundle, FusedBundle)
    assert load_config("jobs/configs/toy.yaml").serving.fuse_adapters
    picture = Image.new("RGB", (40, 24), (200, 30, 30))
    a = served.edit([picture], SOURCES[:1], TARGETS[:1], seed=3)
    b = plain.edit([picture], SOURCES[:1], TARGETS[:1], seed=3)
    assert a.nfe == b.nfe == 8 and a.images[0].size == (40, 24)
    diff = torch.tensor(list(a.images[0].tobytes())) - torch.tensor(list(b.images[0].tobytes()))
    assert diff.abs().max() <= 1  # equal up to the rounding of a pixel


def test_batched_serving_calls_run_in_inference_mode_and_match(bundles):
    bundle, fused, _ = bundles
    picture = Image.new("RGB", (32, 32), (20, 200, 30))
    results = []
    for b in (bundle, fused):
        pipeline = EditPipeline(b, BOUNDARIES, EditingConfig(), 32)
        inverted = invert_batch(pipeline, [picture, picture], SOURCES, [0, 1])
        assert inverted.latents.is_inference()
        results.append(decode_batch(pipeline, inverted.latents, TARGETS, [7.0, 3.0], [0.8, None]).images)
    assert close(results[1], results[0])


def test_prompt_cache_encodes_each_prompt_once_and_keeps_the_recent_ones():
    bundle, _ = adapted()
    reference = bundle.encode_prompts(SOURCES + TARGETS)
    calls = []
    encoder = bundle.text_encoder
    original = encoder.forward

    def counting(input_ids, *args, **kwargs):
        calls.append(input_ids.shape[0])
        return original(input_ids, *args, **kwargs)

    encoder.forward = counting
    bundle.prompt_cache_size = 3
    first = bundle.encode_prompts([SOURCES[0], SOURCES[1], SOURCES[0]])
    assert calls == [2]  # the repeated prompt is encoded once
    assert torch.equal(first, reference[[0, 1, 0]])
    assert torch.equal(bundle.encode_prompts([SOURCES[1]]), reference[1:2]) and calls == [2]
    bundle.encode_prompts(TARGETS)  # 4 prompts seen, 3 kept: SOURCES[0] was least recently used
    assert calls == [2, 2]
    assert torch.equal(bundle.encode_prompts([SOURCES[1], TARGETS[0]]), reference[[1, 2]]) and calls == [2, 2]
    bundle.encode_prompts([SOURCES[0]])
    assert calls == [2, 2, 1]
    big = bundle.encode_prompts(SOURCES + TARGETS)  # a batch larger than the cache still comes back whole
    assert torch.equal(big, reference)
    bundle.prompt_cache_size = 0
    bundle.encode_prompts([SOURCES[0]])
    assert calls[-1] == 1 and len(calls) > 3


def test_a_guided_edit_works_on_prompts_cached_in_inference_mode():
    bundle, _ = adapted()
    fused = fuse_directions(bundle)
    fused.prompt_cache_size = 8
    pipeline = EditPipeline(fused, BOUNDARIES, EditingConfig(), 32)
    picture = Image.new("RGB", (32, 32), (20, 20, 200))
    pipeline.edit([picture], SOURCES[:1], TARGETS[:1], mode="switch")  # caches both prompts in inference mode
    guided = pipeline.edit([picture], SOURCES[:1], TARGETS[:1], mode="guided")
    fresh = EditPipeline(fuse_directions(bundle), BOUNDARIES, EditingConfig(), 32).edit(
        [picture], SOURCES[:1], TARGETS[:1], mode="guided")
    assert guided.nfe == fresh.nfe > 8
    assert guided.images[0].tobytes() == fresh.images[0].tobytes()


def test_compile_compiles_each_served_unet_and_warms_up_before_the_first_request(bundles, monkeypatch):
    """The wiring only: a real torch.compile of the tiny UNets takes minutes on 2 CPU cores (checked
    by hand: outputs within one pixel level of the eager ones); its speed matters on GPUs."""
    bundle, _, _ = bundles
    compiled, batches = [], []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: compiled.append((self, kwargs)))
    pipeline = EditPipeline(bundle, BOUNDARIES, EditingConfig(), 32)
    served_unets = []

    def count(module, args, kwargs):
        batches.append(args[0].shape[0])

    real_fuse = fuse_directions

    def fuse_and_watch(b):
        fused = real_fuse(b)
        for unet in fused.directions.values():
            served_unets.append(unet)
            unet.register_forward_pre_hook(count, with_kwargs=True)
        return fused

    monkeypatch.setattr("icd.editing.pipeline.fuse_directions", fuse_and_watch)
    pipeline.for_serving(ServingConfig(compile="reduce-overhead"))
    assert [(m, k) for m, k in compiled] == [(u, {"mode": "reduce-overhead"}) for u in served_unets]
    assert sorted(set(batches)) == [1, 8] and len(batches) == 16  # 8 passes per warm-up edit
    compiled.clear()
    pipeline.for_serving(ServingConfig())
    assert compiled == []
