"""Adapter activation: cheap per switch, equal to a model holding only that adapter, gradients isolated."""

import pytest
import torch

from icd.models.adapters import add_adapters, load_adapter, save_adapter
from icd.models.bundle import FORWARD, REVERSE
from icd.models.toy import tiny_bundle

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj"]


def adapted(seed: int = 5):
    bundle = tiny_bundle(seed=seed, guidance_dim=16)
    add_adapters(bundle.unet, 4, 4, TARGETS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B starts at zero: give each adapter its own effect
        for name, p in bundle.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return bundle


def inputs(n: int = 2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 77, 32, generator=g)


def test_after_any_switches_each_adapter_equals_a_model_holding_only_it(tmp_path):
    bundle = adapted()
    x, context = inputs()
    for name in (FORWARD, REVERSE):
        save_adapter(bundle.unet, name, tmp_path / name)
    with torch.no_grad():
        for name in (REVERSE, None, FORWARD, FORWARD, None, REVERSE, FORWARD):  # any order, nested too
            with bundle.adapter(name), bundle.adapter(REVERSE if name == FORWARD else FORWARD):
                pass
        outputs = {}
        for name in (FORWARD, REVERSE, None):
            with bundle.adapter(name):
                outputs[name] = bundle.eps(x, 519, context, 3.0)
        for name in (FORWARD, REVERSE):
            alone = tiny_bundle(seed=5, guidance_dim=16)  # the same base weights
            load_adapter(alone.unet, name, tmp_path / name)
            assert torch.allclose(alone.eps(x, 519, context, 3.0), outputs[name], atol=1e-6), name
            with alone.adapter(None):
                assert torch.equal(alone.eps(x, 519, context, 3.0), outputs[None])
    assert not torch.allclose(outputs[FORWARD], outputs[REVERSE])


def test_switching_restores_the_previous_state_and_never_walks_the_unet(monkeypatch):
    bundle = adapted()
    with bundle.adapter(FORWARD):
        pass  # the first switch finds the LoRA layers
    before = bundle._active_adapter()

    def walk(*args, **kwargs):
        raise AssertionError("an adapter switch walked the UNet's modules")

    monkeypatch.setattr(bundle.unet, "named_modules", walk)
    for _ in range(3):
        with bundle.adapter(REVERSE):
            assert bundle._active_adapter() == REVERSE
            with bundle.adapter(None):
                assert bundle._active_adapter() is None
            assert bundle._active_adapter() == REVERSE
        with pytest.raises(RuntimeError), bundle.adapter(FORWARD):
            raise RuntimeError("inside the block")
        assert bundle._active_adapter() == before  # restored, also after an exception
    with pytest.raises(KeyError, match="not on the UNet"), bundle.adapter("other"):
        pass


def test_gradients_reach_only_the_active_adapter_and_trainability_is_unchanged():
    bundle = adapted()
    x, context = inputs()
    trainable = {n for n, p in bundle.unet.named_parameters() if p.requires_grad}
    for name, other in ((FORWARD, REVERSE), (REVERSE, FORWARD)):
        bundle.unet.zero_grad(set_to_none=True)
        with bundle.adapter(name):
            bundle.eps(x, 519, context, 0.0).square().mean().backward()
        with torch.no_grad(), bundle.adapter(None):
            bundle.eps(x, 519, context, 0.0)  # the teacher's pass between the student's
        grads = {n: p.grad for n, p in bundle.unet.named_parameters() if p.grad is not None}
        assert grads and all(f".{name}." in n for n in grads), sorted(grads)[:3]
        assert any(g.abs().sum() > 0 for g in grads.values())
        assert not any(f".{other}." in n for n in grads)
        assert {n for n, p in bundle.unet.named_parameters() if p.requires_grad} == trainable


def test_adapters_added_later_are_found():
    bundle = adapted()
    x, context = inputs()
    with torch.no_grad(), bundle.adapter(FORWARD):
        before = bundle.eps(x, 519, context, 0.0)
    add_adapters(bundle.unet, 4, 4, ["to_q"], names=("extra",))
    with torch.no_grad():
        for name, p in bundle.unet.named_parameters():
            if ".extra." in name and "lora_B" in name:
                p.fill_(0.3)
        with bundle.adapter("extra"):
            extra = bundle.eps(x, 519, context, 0.0)
        with bundle.adapter(FORWARD):
            assert torch.allclose(bundle.eps(x, 519, context, 0.0), before, atol=1e-6)
    assert not torch.allclose(extra, before)
