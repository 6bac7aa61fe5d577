"""Model components: offline tokenizer, loading (dir / pickle refusal), guidance embedding, adapters."""

import pytest
import torch

from icd.config import load_config
from icd.models.adapters import add_adapters, add_adapters_from_config, load_adapter, save_adapter
from icd.models.bundle import FORWARD, REVERSE
from icd.models.guidance_unet import add_guidance_embedding
from icd.models.loading import ModelLoadError, load_bundle, save_bundle
from icd.models.tokenizer import offline_clip_tokenizer
from icd.models.toy import tiny_bundle

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
           "conv1", "conv2", "conv_shortcut", "time_emb_proj"]


def test_offline_tokenizer_gives_sd_ids():
    tok = offline_clip_tokenizer()
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408 and tok.model_max_length == 77
    padded = tok(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert padded.shape == (1, 77) and padded[0, -1].item() == 49407  # padded with <|endoftext|>


def _inputs(bundle, n=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, 8, 8, generator=g)
    context = bundle.encode_prompts(["a red circle on a blue background"] * n)
    return x, context


def test_save_and_load_a_local_directory_round_trip(tmp_path):
    bundle = tiny_bundle(seed=1)
    save_bundle(bundle, tmp_path / "base")
    loaded = load_bundle(str(tmp_path / "base"))
    x, context = _inputs(bundle)
    assert torch.equal(bundle.eps(x, 500, context), loaded.eps(x, 500, loaded.encode_prompts(["a red circle on a blue background"] * 2)))
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(bundle.encode_images(images), loaded.encode_images(images))
    assert torch.equal(loaded.alphas_cumprod, bundle.alphas_cumprod)


def test_pickle_checkpoints_are_refused(tmp_path):
    bundle = tiny_bundle(seed=1)
    save_bundle(bundle, tmp_path / "base")
    unet_dir = tmp_path / "base" / "unet"
    for f in unet_dir.glob("*.safetensors"):
        f.unlink()
    torch.save(bundle.unet.state_dict(), unet_dir / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"diffusion_pytorch_model.bin is a pickle checkpoint; only safetensors"):
        load_bundle(str(tmp_path / "base"))


def test_bad_model_sources(tmp_path):
    (tmp_path / "not_diffusers").mkdir()
    with pytest.raises(ModelLoadError, match="missing unet/"):
        load_bundle(str(tmp_path / "not_diffusers"))
    (tmp_path / "file.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_bundle(str(tmp_path / "file.safetensors"))


def test_zero_initialised_guidance_embedding_keeps_the_teacher():
    bundle = tiny_bundle(seed=2)
    x, context = _inputs(bundle)
    before = bundle.eps(x, 700, context)
    add_guidance_embedding(bundle.unet, 16)
    assert bundle.guidance_dim == 16 and bundle.unet.config.time_cond_proj_dim == 16
    for w in (0.0, 7.0, 19.0):
        assert torch.equal(bundle.eps(x, 700, context, w), before)
    with torch.no_grad():
        bundle.unet.time_embedding.cond_proj.weight.normal_()
    assert not torch.allclose(bundle.eps(x, 700, context, 7.0), bundle.eps(x, 700, context, 0.0))
    with pytest.raises(ValueError, match="already has a guidance embedding"):
        add_guidance_embedding(bundle.unet, 16)


def test_adapters_disabled_equal_the_base_unet_and_save_load_is_identical(tmp_path):
    bundle = tiny_bundle(seed=3, guidance_dim=16)
    x, context = _inputs(bundle)
    base = bundle.eps(x, 519, context, 7.0)
    add_adapters(bundle.unet, 4, 4, TARGETS)
    trainable = {n for n, p in bundle.unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".icd_forward." in n for n in trainable) and any(".icd_reverse." in n for n in trainable)
    with torch.no_grad():
        for name, p in bundle.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    with bundle.adapter(None):
        assert torch.equal(bundle.eps(x, 519, context, 7.0), base)
    with bundle.adapter(FORWARD):
        forward_out = bundle.eps(x, 519, context, 7.0)
    with bundle.adapter(REVERSE):
        reverse_out = bundle.eps(x, 519, context, 7.0)
    assert not torch.allclose(forward_out, base) and not torch.allclose(forward_out, reverse_out)

    save_adapter(bundle.unet, FORWARD, tmp_path / "forward")
    save_adapter(bundle.unet, REVERSE, tmp_path / "reverse")
    assert (tmp_path / "forward" / "adapter_config.json").exists()

    fresh = tiny_bundle(seed=3, guidance_dim=16)
    load_adapter(fresh.unet, FORWARD, tmp_path / "forward")
    load_adapter(fresh.unet, REVERSE, tmp_path / "reverse")
    with fresh.adapter(FORWARD):
        assert torch.allclose(fresh.eps(x, 519, context, 7.0), forward_out, atol=1e-6)
    with fresh.adapter(REVERSE):
        assert torch.allclose(fresh.eps(x, 519, context, 7.0), reverse_out, atol=1e-6)
    with fresh.adapter(None):
        assert torch.equal(fresh.eps(x, 519, context, 7.0), base)
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors"):
        load_adapter(fresh.unet, "other", tmp_path)


def test_production_lora_targets_cover_every_named_layer_type():
    bundle = tiny_bundle(seed=4)
    add_adapters_from_config(bundle.unet, load_config("jobs/configs/sd15.yaml").model)
    wrapped = [name for name, module in bundle.unet.named_modules() if hasattr(module, "lora_A")]
    for target in ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                   "conv1", "conv2", "time_emb_proj"):
        assert any(name.endswith("." + target) for name in wrapped), target
    lora = [m for m in bundle.unet.modules() if hasattr(m, "lora_A")]
    # Rank 64 with PEFT's default alpha 8: effective scale 8/64, as the released adapters.
    assert all(m.r["icd_forward"] == 64 and m.scaling["icd_reverse"] == 8 / 64 for m in lora)


def test_unreachable_hub_id_says_what_to_do_instead():
    import subprocess
    import sys

    code = ("from icd.models.loading import load_bundle, ModelLoadError\n"
            "try:\n    load_bundle('stable-diffusion-v1-5/stable-diffusion-v1-5')\n"
            "except ModelLoadError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
                         capture_output=True, text=True, timeout=120)
    assert "from the Hugging Face hub" in out.stdout and "s3:// URI" in out.stdout
