"""Importing the published iCD checkpoints: built here in the official layout, checked against the
official way of loading them (kohya renaming + diffusers ``load_lora_weights`` + ``fuse_lora``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file, save_file

from icd.models.bundle import FORWARD, REVERSE
from icd.registry.release_import import prepare_release
from icd.registry.releases import ReleaseError, boundaries_in_name, release_boundaries
from icd.train.stages import load_stage_bundle
from release_checkpoints import SD15_REDUCED_UNET, kohya_state_dict

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_boundaries_come_from_the_names_and_must_mirror():
    assert boundaries_in_name("ckpt/iCD-SD15-reverse_259_519_779_999.safetensors") == ("reverse", (259, 519, 779, 999))
    assert boundaries_in_name("iCD-SD15-forward_19_339_699.safetensors") == ("forward", (19, 339, 699))
    assert boundaries_in_name("finetuned_forward_model.safetensors") is None
    b = release_boundaries((259, 519, 779, 999), (19, 259, 519, 779))
    assert b.reverse_timesteps == (999, 779, 519, 259) and b.forward_timesteps == (19, 259, 519, 779)
    # Inverse-and-Edit: the forward file has no boundaries in its name; mirrored from the reverse one, from t = 0
    assert release_boundaries((259, 519, 779, 999), None, 0).forward_timesteps == (0, 259, 519, 779)
    assert release_boundaries(None, (19, 339, 699)).reverse_timesteps == (999, 699, 339)
    with pytest.raises(ReleaseError, match=r"do not mirror .* expected \[19, 259, 519, 779\]"):
        release_boundaries((259, 519, 779, 999), (19, 249, 499, 699))
    with pytest.raises(ReleaseError, match="must end at 999"):
        release_boundaries((259, 519, 779), None)
    with pytest.raises(ReleaseError, match="no boundaries"):
        release_boundaries(None, None)


@pytest.fixture(scope="module")
def imported(released_checkpoints, tmp_path_factory):
    files = released_checkpoints
    release = prepare_release(str(files.teacher), str(files.reverse()), str(files.forward()), str(files.base),
                              tmp_path_factory.mktemp("imported"))
    return files, release


def official_pipeline(files, bundle, lora_path):
    """One direction as the official inference code builds it: the teacher, the LoRA renamed to kohya keys,
    diffusers' load_lora_weights, fuse_lora (in fp32 here)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    teacher = UNet2DConditionModel(**SD15_REDUCED_UNET, time_cond_proj_dim=512)
    teacher.load_state_dict(torch.load(files.teacher, weights_only=True))
    pipe = StableDiffusionPipeline(vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer,
                                   unet=teacher, scheduler=DDIMScheduler(clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(kohya_state_dict(load_file(lora_path)))
    pipe.fuse_lora()
    return pipe


def test_each_direction_equals_the_official_loading(imported):
    from diffusers import LatentConsistencyModelPipeline

    files, release = imported
    assert release.manifest["boundaries"] == {"reverse": [999, 779, 519, 259], "forward": [19, 259, 519, 779]}
    assert release.rank == 64 and release.manifest["lora"]["alpha"] == 8.0
    bundle = load_stage_bundle(release.manifest)  # our loading path, as the registry model and Serve use it
    torch.manual_seed(1)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([999, 259])
    context = bundle.encode_prompts(["a red circle on a blue background", ""])
    w = torch.tensor([7.0, 0.0])
    embedding = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, 512)  # diffusers' own
    for name, path in ((REVERSE, files.reverse()), (FORWARD, files.forward())):
        pipe = official_pipeline(files, bundle, path)
        with torch.no_grad():
            reference = pipe.unet(x, t, encoder_hidden_states=context, timestep_cond=embedding).sample
            with bundle.adapter(name):
                ours = bundle.eps(x, t, context, w)
            with bundle.adapter(None):
                teacher = bundle.eps(x, t, context, w)
        assert (ours - reference).abs().max() < 1e-4, name
        assert (reference - teacher).abs().max() > 0.05  # the adapter really changes epsilon
    # the sources are recorded with their hashes
    assert set(release.sources) == {"teacher", "reverse", "forward"}
    assert all(len(s["sha256"]) == 64 for s in release.sources.values())


def test_the_three_step_set_and_an_explicit_start(released_checkpoints, tmp_path):
    files = released_checkpoints
    release = prepare_release(str(files.teacher), str(files.reverse("3steps")), str(files.forward("3steps")),
                              str(files.base), tmp_path / "a", start_timestep=0)
    assert release.manifest["boundaries"] == {"reverse": [999, 699, 339], "forward": [0, 339, 699]}
    # Inverse-and-Edit: a forward file without boundaries in its name, started at t = 0, mirrored from the reverse
    import shutil

    shutil.copy(files.forward(), tmp_path / "finetuned_forward_model.safetensors")
    cycle = prepare_release(str(files.teacher), str(files.reverse()), str(tmp_path / "finetuned_forward_model.safetensors"),
                            str(files.base), tmp_path / "b", start_timestep=0)
    assert cycle.manifest["boundaries"] == {"reverse": [999, 779, 519, 259], "forward": [0, 259, 519, 779]}
    assert cycle.start_timestep == 0


def test_a_hub_file_id_without_hub_access_says_what_to_give_instead(monkeypatch, tmp_path):
    from icd.registry.release_import import fetch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ReleaseError, match="--forward ilushado/Cycle-consistency/finetuned_forward_model.safetensors: "
                                           "cannot download it from the Hugging Face hub .*local path or an s3:// URI"):
        fetch("ilushado/Cycle-consistency/finetuned_forward_model.safetensors", "--forward", tmp_path)


def refused(files, tmp_path, match, **changes):
    args = dict(teacher=str(files.teacher), reverse=str(files.reverse()), forward=str(files.forward()),
                base=str(files.base), directory=tmp_path / "out")
    args.update(changes)
    with pytest.raises(ReleaseError, match=match):
        prepare_release(**args)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_refusals_name_the_file_and_the_problem(released_checkpoints, tmp_path):
    import argparse

    files = released_checkpoints
    state = torch.load(files.teacher, weights_only=True)
    # a pickle that is not tensor-only is never unpickled
    torch.save({**state, "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pt")
    refused(files, tmp_path, r"--teacher .*pickled.pt is not a tensor-only checkpoint", teacher=str(tmp_path / "pickled.pt"))
    # a plain UNet (no guidance embedding)
    torch.save({k: v for k, v in state.items() if "cond_proj" not in k}, tmp_path / "plain.pt")
    refused(files, tmp_path, "has no guidance embedding", teacher=str(tmp_path / "plain.pt"))
    # SDXL
    torch.save({**state, "add_embedding.linear_1.weight": torch.zeros(4, 4)}, tmp_path / "xl.pt")
    refused(files, tmp_path, "is an SDXL UNet but --base is SD1.5", teacher=str(tmp_path / "xl.pt"))
    # boundaries that do not mirror
    refused(files, tmp_path, "do not mirror", forward=str(files.forward("4steps_2")))
    # adapter keys: missing, unexpected, misshapen
    lora = load_file(files.reverse())
    first = sorted(k for k in lora if ".up_blocks." in k and "lora_A" in k)[0]
    save_file({k: v for k, v in lora.items() if k != first}, str(tmp_path / "x-reverse_259_519_779_999.safetensors"))
    refused(files, tmp_path, rf"does not match the teacher UNet: missing keys \['{first[len('unet.base_model.model.'):]}",
            reverse=str(tmp_path / "x-reverse_259_519_779_999.safetensors"))
    extra = {**lora, "unet.base_model.model.down_blocks.9.attn.to_q.lora_A.weight": torch.zeros(64, 8),
             "unet.base_model.model.down_blocks.9.attn.to_q.lora_B.weight": torch.zeros(8, 64)}
    save_file(extra, str(tmp_path / "y-reverse_259_519_779_999.safetensors"))
    refused(files, tmp_path, r"unexpected keys \['down_blocks.9.attn.to_q.lora_A.weight'\]",
            reverse=str(tmp_path / "y-reverse_259_519_779_999.safetensors"))
    key = sorted(k for k in lora if "lora_A" in k and "to_q" in k)[0]
    save_file({**lora, key: torch.zeros(64, 7)}, str(tmp_path / "z-reverse_259_519_779_999.safetensors"))
    refused(files, tmp_path, "has shapes", reverse=str(tmp_path / "z-reverse_259_519_779_999.safetensors"))
    # a file that is not a LoRA at all
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "w-forward_19_259_519_779.safetensors"))
    refused(files, tmp_path, "not an official iCD LoRA key", forward=str(tmp_path / "w-forward_19_259_519_779.safetensors"))
    # inputs that do not exist, or a forward file given as --reverse
    refused(files, tmp_path, "--teacher /nonexistent.pt: no such file", teacher="/nonexistent.pt")
    refused(files, tmp_path, "the name says it is the forward model", reverse=str(files.forward()))


def run_job(args, tracking_uri):
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "jobs/import_release.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_job_registers_a_version_with_sources_and_nothing_on_refusal(released_checkpoints, tmp_path):
    files = released_checkpoints
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_experiment("icd-imports", artifact_location=str(tmp_path / "artifacts"))
    common = ["--base", str(files.base), "--config", "jobs/configs/toy.yaml", "--name", "icd-release"]
    bad = run_job(["--teacher", str(files.teacher), "--reverse", str(files.reverse()),
                   "--forward", str(files.forward("3steps")), *common], uri)
    assert bad.returncode == 2 and "do not mirror" in bad.stderr and "Nothing was registered" in bad.stderr
    assert client.search_registered_models() == []
    ok = run_job(["--teacher", str(files.teacher), "--reverse", str(files.reverse("3steps")),
                  "--forward", str(files.forward("3steps")), *common, "--alias", "release"], uri)
    assert ok.returncode == 0, ok.stderr[-3000:]
    result = json.loads(ok.stdout.strip().splitlines()[-1])
    assert result == {"name": "icd-release", "version": 1, "boundaries": {"reverse": [999, 699, 339],
                      "forward": [19, 339, 699]}, "start_timestep": 19, "alias": "release"}
    version = client.get_model_version_by_alias("icd-release", "release")
    tags = version.tags
    assert tags["icd.source.teacher"] == str(files.teacher) and len(tags["icd.source.teacher.sha256"]) == 64
    assert tags["icd.source.reverse"] == str(files.reverse("3steps")) and "icd.note" not in tags
    # registered as a model from code: it loads and edits with 3 + 3 passes
    import base64
    import io

    import pandas as pd
    from PIL import Image

    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model("models:/icd-release/1")
    finally:
        mlflow.set_tracking_uri(None)
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    out = model.predict(pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode()],
                                      "source_prompt": ["a red circle"], "target_prompt": ["a blue circle"]}))
    assert list(out["nfe"]) == [6]


def test_an_icd_xl_release_imports_onto_an_sdxl_base_and_edits(tmp_path):
    """iCD-XL's files (SDXL-shaped here): each direction's eps equals the teacher with that LoRA applied
    by PEFT directly; the wrong base is refused; the registered model edits through SDXL's conditioning."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from icd.models import conditioning
    from icd.train.stages import load_stage_bundle
    from release_checkpoints import OFFICIAL_TARGETS, RANK, build_released_xl_checkpoints

    files = build_released_xl_checkpoints(tmp_path / "xl")
    release = prepare_release(str(files.teacher), str(files.reverse), str(files.forward), str(files.base),
                              tmp_path / "out")
    assert release.boundaries.reverse_timesteps == (999, 699, 499, 249)
    assert release.boundaries.forward_timesteps == (19, 249, 499, 699)
    bundle = load_stage_bundle(release.manifest)
    assert bundle.is_sdxl and bundle.guidance_dim == 512
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = bundle.encode_prompts(["a red circle", "a green star"])
    hidden, pooled, time_ids = conditioning.unpack(context, bundle.pooled_dim)
    teacher_state = torch.load(files.teacher, weights_only=True)
    from diffusers import UNet2DConditionModel

    for name, path in (("icd_reverse", files.reverse), ("icd_forward", files.forward)):
        reference = UNet2DConditionModel.from_config({**bundle.unet.config, "time_cond_proj_dim": 512})
        reference.load_state_dict(teacher_state)
        reference = get_peft_model(reference, LoraConfig(r=RANK, lora_alpha=8, target_modules=OFFICIAL_TARGETS))
        official = {k.removeprefix("unet."): v for k, v in load_file(path).items()}
        set_peft_model_state_dict(reference, official)
        cond = bundle.guidance_cond(7.0, 2)
        expected = reference(x, 499, encoder_hidden_states=hidden, timestep_cond=cond,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        with bundle.adapter(name):
            ours = bundle.eps(x, 499, context, w=7.0)
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
        with bundle.adapter(None):
            assert (bundle.eps(x, 499, context, w=7.0) - expected).abs().max() > 1e-3  # the LoRA matters
    # an SDXL teacher on an SD1.5 base is refused, naming both
    from release_checkpoints import build_released_checkpoints

    sd15 = build_released_checkpoints(tmp_path / "sd15")
    with pytest.raises(ReleaseError, match="is an SDXL UNet but --base is SD1.5"):
        prepare_release(str(files.teacher), str(files.reverse), str(files.forward), str(sd15.base), tmp_path / "bad")
    # the edit pipeline on the imported model: 4 + 4 passes
    from PIL import Image

    from icd.config import load_config
    from icd.editing.pipeline import EditPipeline

    config = load_config("jobs/configs/toy.yaml")
    pipeline = EditPipeline.from_manifest(release.manifest, config.editing, 32, serving=config.serving)
    out = pipeline.edit([Image.new("RGB", (32, 32), (200, 30, 30))], ["a red circle"], ["a blue circle"])
    assert out.nfe == 8 and out.images[0].size == (32, 32)
