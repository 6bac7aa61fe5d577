"""The no-regression gate: its decision on given numbers, and on real toy models (a good and a damaged stage)."""

import numpy as np
import pytest
import torch

from icd.config import ConfigError, load_config
from icd.data.shapes import random_sample
from icd.diffusion.boundaries import Boundaries
from icd.evaluation.regression import check_gates, guidance_eps_mse, refusal, stage_quality
from icd.evaluation.stage_check import input_bundle
from icd.models.bundle import REVERSE
from icd.train.stages import export_untrained, load_stage_bundle


def test_gates_compare_after_with_before_in_each_metrics_direction():
    config = load_config("jobs/configs/toy.yaml")
    gates = config.tracking.stage_gates
    ok = check_gates("icd", {"psnr": 20.3, "caption_accuracy": 0.80}, {"psnr": 21.0, "caption_accuracy": 0.78}, gates)
    assert [r.metric for r in ok] == ["psnr", "caption_accuracy"] and all(r.passed for r in ok)
    assert refusal(ok) is None
    worse = check_gates("icd", {"psnr": 20.3, "caption_accuracy": 0.80}, {"psnr": 8.5, "caption_accuracy": 0.70}, gates)
    message = refusal(worse)
    assert "stage icd" in message and "icd.psnr: 8.5 after training against 20.3 before" in message
    assert "icd.caption_accuracy: 0.7 after" in message  # 0.10 lost, 0.03 allowed
    # eps_mse: lower is better
    distill = check_gates("cfg_distill", {"eps_mse": 0.30, "caption_accuracy": 0.8},
                          {"eps_mse": 0.05, "caption_accuracy": 0.8}, gates)
    assert all(r.passed for r in distill)
    assert not check_gates("cfg_distill", {"eps_mse": 0.30, "caption_accuracy": 0.8},
                           {"eps_mse": 0.31, "caption_accuracy": 0.8}, gates)[0].passed
    with pytest.raises(KeyError, match="cycle measures psnr"):
        check_gates("cycle", {}, {}, gates)


def test_a_gate_must_name_a_metric_its_stage_measures():
    with pytest.raises(ConfigError, match="stage cycle measures psnr, not caption_accuracy"):
        load_config("jobs/configs/toy.yaml", ["tracking.stage_gates=[{stage: cycle, metric: caption_accuracy}]"])


@pytest.fixture(scope="module")
def toy_stages(tmp_path_factory):
    """The toy base through cfg_distill and icd as built (untrained), exported like a real stage."""
    config = load_config("jobs/configs/toy.yaml")
    root = tmp_path_factory.mktemp("stages")
    icd = export_untrained(config, "check", str(root))
    from icd.train.stages import StagePaths, read_stage_manifest

    cfg = read_stage_manifest(StagePaths.of(config, "cfg_distill", "check", str(root)).manifest)
    samples = [random_sample(1_500_000_000 + i) for i in range(16)]
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return config, cfg, icd, images, [s.caption for s in samples]


def test_the_icd_gate_passes_the_untrained_output_and_refuses_adapters_scaled_up(toy_stages):
    config, cfg, icd, images, captions = toy_stages
    boundaries = Boundaries.from_config(config.method)
    measure = lambda bundle: stage_quality("icd", bundle, images, captions, config.editing, boundaries)  # noqa: E731
    before = measure(input_bundle("icd", config, cfg, None))
    output = load_stage_bundle(icd)
    good = check_gates("icd", before, measure(output), config.tracking.stage_gates)
    assert all(r.passed for r in good), [r.describe() for r in good]

    # damage the decoder: a small random LoRA update, scaled x10
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in output.unet.named_parameters():
            if f"lora_B.{REVERSE}." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02 * 10)
    damaged = check_gates("icd", before, measure(output), config.tracking.stage_gates)
    message = refusal(damaged)
    assert message is not None and "stage icd" in message and "icd.psnr" in message
    psnr = next(r for r in damaged if r.metric == "psnr")
    assert psnr.after < psnr.before - 1.0


def test_guidance_eps_mse_is_zero_for_the_teacher_cfg_itself_and_large_for_one_unguided_pass(toy_stages):
    config, cfg, _, images, captions = toy_stages
    teacher = input_bundle("cfg_distill", config, None, None)
    latents, context = teacher.encode_images(images), teacher.encode_prompts(captions)
    uncond = teacher.encode_prompts([""])
    # w = 0 everywhere: the CFG target is eps(c), exactly the teacher's one pass
    assert guidance_eps_mse(teacher, teacher, latents, context, uncond, [0.0]) == pytest.approx(0.0, abs=1e-10)
    assert guidance_eps_mse(teacher, teacher, latents, context, uncond, [7.0]) > 1e-3
    # the untrained cfg_distill output (zero w-embedding) answers like the unguided teacher
    student = load_stage_bundle(cfg)
    assert guidance_eps_mse(student, teacher, latents, context, uncond, [7.0]) == pytest.approx(
        guidance_eps_mse(teacher, teacher, latents, context, uncond, [7.0]), rel=1e-4)


def test_real_photo_captions_are_measured_without_caption_accuracy(toy_stages):
    config, cfg, icd, images, _ = toy_stages
    photos = ["a photo of a dog on a sofa"] * len(images[:4])
    measured = stage_quality("icd", load_stage_bundle(icd), images[:4], photos, config.editing,
                             Boundaries.from_config(config.method))
    assert set(measured) == {"psnr"}
    # the default gates (SD1.5's) ask for what real photos can give; the toy's caption gate cannot be met
    defaults = load_config(None).tracking.stage_gates
    assert {g.metric for g in defaults} == {"eps_mse", "psnr"}
    with pytest.raises(KeyError, match="caption_accuracy needs shapes-world captions"):
        check_gates("icd", measured, measured, config.tracking.stage_gates)
