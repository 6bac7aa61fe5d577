"""Stage objectives without Ray: terms against hand computation, loss decrease, which weights move."""

from pathlib import Path

import numpy as np
import pytest
import torch

from icd.config import load_config
from icd.data.shapes import render, sample_specs
from icd.diffusion.boundaries import Boundaries
from icd.diffusion.schedule import scaled_linear_alphas_cumprod
from icd.models.adapters import add_adapters
from icd.models.bundle import FORWARD, REVERSE
from icd.models.toy import tiny_bundle
from icd.train import objectives
from icd.train.checkpointing import TrainState, load_checkpoint, restore_checkpoint, save_checkpoint
from icd.train.target import EMATarget, ema_update, target_name
from icd.train.stages import (StagePaths, artifact_layout, build_stage_model, export_stage, make_manifest,
                              stage_identity)

DEFAULT = Boundaries((999, 779, 519, 259), (19, 259, 519, 779))
ACP = scaled_linear_alphas_cumprod().double()


def ab(t):
    """(alpha_t, sigma_t) from abar, computed here independently; t < 0 is the clean sample."""
    if t < 0:
        return 1.0, 0.0
    return float(ACP[t].sqrt()), float((1 - ACP[t]).sqrt())


def jump_by_hand(x, eps, t, s):
    """x_s = alpha_s x0 + sigma_s eps, x0 = (x_t - sigma_t eps) / alpha_t; s = 0 is the clean sample."""
    a_t, s_t = ab(t)
    a_s, s_s = ab(-1 if s == 0 else s)
    return a_s * (x - s_t * eps) / a_t + s_s * eps


def huber(a, b, c=0.001):
    d = (a - b).double()
    return float((torch.sqrt(d ** 2 + c * c) - c).mean())


@pytest.fixture(scope="module")
def guided_tiny():
    bundle = tiny_bundle(seed=0, guidance_dim=16)
    add_adapters(bundle.unet, 4, 4, ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    return bundle


def test_reverse_consistency_term_equals_a_hand_computation(guided_tiny):
    bundle = guided_tiny
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, 32, generator=g)
    t, w = torch.tensor([539, 19]), torch.tensor([7.0, 0.0])
    got = objectives.reverse_consistency_term(bundle, x0, context, t, w, noise, DEFAULT, 20, 0.001)

    expected = []
    for i, (ti, si, ti2) in enumerate([(539, 519, 519), (19, 0, 0)]):
        a, s = ab(ti)
        x_t = a * x0[i:i + 1] + s * noise[i:i + 1]
        c = context[i:i + 1]
        with bundle.adapter(REVERSE):
            student = jump_by_hand(x_t, bundle.eps(x_t, ti, c, w[i]), ti, si)
        with bundle.adapter(None):
            x_teacher = jump_by_hand(x_t, bundle.eps(x_t, ti, c, w[i]), ti, ti2)
        # both teacher points are on the boundary: the target is the teacher's point itself
        expected.append(huber(student, x_teacher))
    assert got.item() == pytest.approx(np.mean(expected), rel=1e-4)


def test_forward_consistency_term_equals_a_hand_computation(guided_tiny):
    bundle = guided_tiny
    g = torch.Generator().manual_seed(4)
    x0, noise, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    t = torch.tensor([279])  # forward segment 259 -> 519; teacher to 299, target from there
    got = objectives.forward_consistency_term(bundle, x0, context, t, noise, DEFAULT, 20, 0.001)
    a, s = ab(279)
    x_t = a * x0 + s * noise
    with bundle.adapter(FORWARD):
        student = jump_by_hand(x_t, bundle.eps(x_t, 279, context, 0.0), 279, 519)
    with bundle.adapter(None):
        x_299 = jump_by_hand(x_t, bundle.eps(x_t, 279, context, 0.0), 279, 299)
    with bundle.adapter(FORWARD):
        target = jump_by_hand(x_299, bundle.eps(x_299, 299, context, 0.0), 299, 519)
    assert got.item() == pytest.approx(huber(student, target), rel=1e-4)


def test_eps_space_divides_each_consistency_distance_by_the_students_eps_gain(guided_tiny):
    bundle = guided_tiny
    g = torch.Generator().manual_seed(4)
    x0, noise, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    gain = lambda t, s: ab(-1 if s == 0 else s)[1] - ab(-1 if s == 0 else s)[0] * ab(t)[1] / ab(t)[0]  # noqa: E731
    # forward: 279 -> 519 as in the latent-space test above
    a, s = ab(279)
    x_t = a * x0 + s * noise
    with bundle.adapter(FORWARD):
        student = jump_by_hand(x_t, bundle.eps(x_t, 279, context, 0.0), 279, 519)
    with bundle.adapter(None):
        x_299 = jump_by_hand(x_t, bundle.eps(x_t, 279, context, 0.0), 279, 299)
    with bundle.adapter(FORWARD):
        target = jump_by_hand(x_299, bundle.eps(x_299, 299, context, 0.0), 299, 519)
    got = objectives.forward_consistency_term(bundle, x0, context, torch.tensor([279]), noise, DEFAULT, 20, 0.001,
                                              space="eps")
    assert got.item() == pytest.approx(huber(student / gain(279, 519), target / gain(279, 519)), rel=1e-4)
    # reverse on its first segment (999 -> 779), where the gain is about 2.1: the distance shrinks by it
    t, w = torch.tensor([999]), torch.tensor([0.0])
    latent = objectives.reverse_consistency_term(bundle, x0, context, t, w, noise, DEFAULT, 20, 0.001)
    eps = objectives.reverse_consistency_term(bundle, x0, context, t, w, noise, DEFAULT, 20, 0.001, space="eps")
    assert abs(gain(999, 779)) == pytest.approx(2.095, abs=1e-3)
    assert 1.5 < latent.item() / eps.item() < 2.2  # pseudo-Huber is ~L1 well above c: about the gain
    with pytest.raises(ValueError, match="consistency_space"):
        objectives.distance_scale(bundle, t, t, "pixels")


def test_the_objective_measures_consistency_in_the_configured_space(guided_tiny, monkeypatch):
    seen = []
    real = objectives.distance_scale
    monkeypatch.setattr(objectives, "distance_scale", lambda b, t, s, space: seen.append(space) or real(b, t, s, space))
    x0, context = torch.zeros(2, 4, 8, 8), torch.zeros(2, 77, 32)
    for space in ("latent", "eps"):
        config = load_config("jobs/configs/toy.yaml", [f"method.consistency_space={space}"])
        objective = objectives.ICDObjective(guided_tiny, DEFAULT, config.method)
        objective.consistency_terms(x0, context, torch.Generator().manual_seed(0))
        for term in ("cd_reverse", "cd_forward"):
            objective.single_term(term, x0, context, torch.Generator().manual_seed(0))
    assert seen == ["latent"] * 4 + ["eps"] * 4
    # identities of models trained before the option existed are unchanged; "eps" trains a different model
    toy = load_config("jobs/configs/toy.yaml")
    eps = load_config("jobs/configs/toy.yaml", ["method.consistency_space=eps"])
    assert stage_identity(toy, "cfg_distill") == stage_identity(eps, "cfg_distill")
    assert stage_identity(toy, "icd") != stage_identity(eps, "icd")


def test_preservation_terms_match_their_definitions_in_the_renoise_form(guided_tiny):
    bundle = guided_tiny
    g = torch.Generator().manual_seed(5)
    x0, n1, n2, context = (torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g),
                           torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g))
    # segment 3 is 259 -> 0: the encoder maps it back from t = 19
    segment = torch.tensor([3])
    lf = objectives.forward_preservation_term(bundle, x0, context, segment, n1, n2, DEFAULT, 0.001, "renoise")
    a, s = ab(259)
    x_hi = a * x0 + s * n1
    with bundle.adapter(REVERSE):
        x_clean = jump_by_hand(x_hi, bundle.eps(x_hi, 259, context, 0.0), 259, 0)
    a19, s19 = ab(19)
    x_19 = a19 * x_clean + s19 * n2
    with bundle.adapter(FORWARD):
        back = jump_by_hand(x_19, bundle.eps(x_19, 19, context, 0.0), 19, 259)
    assert lf.item() == pytest.approx(huber(back, x_hi), rel=1e-4)

    lr = objectives.reverse_preservation_term(bundle, x0, context, torch.tensor([1]), n1, n2, DEFAULT, 0.001, "renoise")
    a, s = ab(519)
    x_lo = a * x0 + s * n1  # segment 1 is 779 -> 519
    with bundle.adapter(FORWARD):
        x_hi = jump_by_hand(x_lo, bundle.eps(x_lo, 519, context, 0.0), 519, 779)
    with bundle.adapter(REVERSE):
        back = jump_by_hand(x_hi, bundle.eps(x_hi, 779, context, 0.0), 779, 519)
    assert lr.item() == pytest.approx(huber(back, x_lo), rel=1e-4)


def test_clean_end_preservation_terms_are_deterministic_jumps_in_the_official_form(guided_tiny):
    """segment 259 -> 0: Lf's decoder lands on 19 with its own epsilon, Lr runs 19 -> 259 -> 19 on x_19."""
    bundle = guided_tiny
    g = torch.Generator().manual_seed(6)
    x0, n1, n2, n3, context = (torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g),
                               torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g),
                               torch.randn(1, 77, 32, generator=g))
    segment = torch.tensor([3])
    lf = objectives.forward_preservation_term(bundle, x0, context, segment, n1, n2, DEFAULT, 0.001, "jump")
    a, s = ab(259)
    x_hi = a * x0 + s * n1
    with bundle.adapter(REVERSE):
        x_19 = jump_by_hand(x_hi, bundle.eps(x_hi, 259, context, 0.0), 259, 19)
    with bundle.adapter(FORWARD):
        back = jump_by_hand(x_19, bundle.eps(x_19, 19, context, 0.0), 19, 259)
    assert lf.item() == pytest.approx(huber(back, x_hi), rel=1e-4)
    # a function of x_hi alone: the second noise draw changes nothing (it does in the renoise form)
    again = objectives.forward_preservation_term(bundle, x0, context, segment, n1, n3, DEFAULT, 0.001, "jump")
    assert again.item() == lf.item()
    renoised = objectives.forward_preservation_term(bundle, x0, context, segment, n1, n3, DEFAULT, 0.001, "renoise")
    assert renoised.item() != pytest.approx(lf.item(), rel=1e-3)

    lr = objectives.reverse_preservation_term(bundle, x0, context, segment, n1, n2, DEFAULT, 0.001, "jump")
    a19, s19 = ab(19)
    x_lo = a19 * x0 + s19 * n1
    with bundle.adapter(FORWARD):
        up = jump_by_hand(x_lo, bundle.eps(x_lo, 19, context, 0.0), 19, 259)
    with bundle.adapter(REVERSE):
        down = jump_by_hand(up, bundle.eps(up, 259, context, 0.0), 259, 19)
    assert lr.item() == pytest.approx(huber(down, x_lo), rel=1e-4)
    assert objectives.reverse_preservation_term(bundle, x0, context, segment, n1, n3, DEFAULT, 0.001,
                                                "jump").item() == lr.item()


def test_the_objective_uses_the_configured_clean_end(guided_tiny, monkeypatch):
    seen = []
    real = objectives.preservation_ends
    monkeypatch.setattr(objectives, "preservation_ends", lambda b, s, mode: seen.append(mode) or real(b, s, mode))
    for mode in ("renoise", "jump"):
        config = load_config("jobs/configs/toy.yaml", [f"method.preservation_clean_end={mode}"])
        objective = objectives.ICDObjective(guided_tiny, DEFAULT, config.method)
        objective.preservation_term("forward", torch.zeros(1, 4, 8, 8), torch.zeros(1, 77, 32),
                                    torch.Generator().manual_seed(0))
    assert seen == ["renoise", "jump"]
    with pytest.raises(ValueError, match="preservation_clean_end"):
        objectives.preservation_ends(DEFAULT, torch.tensor([0]), "fresh")


def test_reverse_guidance_scales_set_the_codes_of_the_reverse_targets_only(guided_tiny):
    config = load_config("jobs/configs/toy.yaml", ["method.reverse_guidance_scales=[0, 0, 3]"])
    objective = objectives.ICDObjective(guided_tiny, DEFAULT, config.method)
    assert objective.guidance_scales.tolist() == [0.0, 0.0, 3.0]
    default = objectives.ICDObjective(guided_tiny, DEFAULT, load_config(None).method)  # SD1.5: the paper's codes
    assert default.guidance_scales.tolist() == [0.0, 7.0, 11.0, 15.0, 19.0]
    # cfg_distill still learns every code of guidance_scales: its identity ignores the reverse codes
    assert stage_identity(config, "cfg_distill") == stage_identity(load_config("jobs/configs/toy.yaml"), "cfg_distill")
    assert stage_identity(config, "icd") != stage_identity(load_config("jobs/configs/toy.yaml"), "icd")
    assert stage_identity(config, "icd") != stage_identity(
        load_config("jobs/configs/toy.yaml", ["method.reverse_guidance_scales=null"]), "icd")


def test_lora_init_sets_the_scale_of_a_and_leaves_the_adapter_at_zero():
    from icd.models.adapters import lora_config

    stds = {}
    for init in ("default", "gaussian"):
        bundle = tiny_bundle(seed=0, guidance_dim=16)
        add_adapters(bundle.unet, 8, 8, ["to_q"], names=(REVERSE,), init=init)
        layer = next(m for n, m in bundle.unet.named_modules() if n.endswith("attn1.to_q"))
        a, b = layer.lora_A[REVERSE].weight, layer.lora_B[REVERSE].weight
        assert torch.count_nonzero(b) == 0  # the adapter starts as the identity either way
        fan_in = a.shape[1]
        if init == "default":  # Kaiming-uniform with a = sqrt(5): |A| <= 1 / sqrt(fan_in)
            assert a.abs().max() <= 1 / fan_in ** 0.5 + 1e-6
        stds[init] = (float(a.std()), fan_in)
    assert stds["gaussian"][0] == pytest.approx(1 / 8, rel=0.15)  # PEFT's "gaussian": N(0, 1/r), r = 8
    std, fan_in = stds["default"]
    assert std == pytest.approx(1 / (3 * fan_in) ** 0.5, rel=0.15)  # uniform on +-1/sqrt(fan_in)
    with pytest.raises(ValueError, match="lora_init"):
        lora_config(8, 8, ["to_q"], init="zeros")
    # the stage builds its adapters with model.lora_init
    from icd.models.adapters import add_adapters_from_config

    for init in ("default", "gaussian"):
        bundle = tiny_bundle(seed=0, guidance_dim=16)
        add_adapters_from_config(bundle.unet, load_config("jobs/configs/toy.yaml", [f"model.lora_init={init}"]).model)
        assert bundle.unet.peft_config[REVERSE].init_lora_weights == {"default": True, "gaussian": "gaussian"}[init]


def test_the_conv_target_adapts_the_down_and_up_sampler_convolutions():
    bundle = tiny_bundle(seed=0, guidance_dim=16)
    add_adapters(bundle.unet, 4, 4, ["conv1", "conv"], names=(FORWARD,))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in bundle.unet.named_parameters() if ".lora_A." in n}
    assert any("downsamplers.0.conv" in n for n in adapted) and any("upsamplers.0.conv" in n for n in adapted)
    assert not any(n.endswith(("conv_in", "conv_out")) for n in adapted)


def test_unmirrored_boundaries_are_refused_for_preservation_losses():
    with pytest.raises(ValueError, match="forward_timesteps"):
        objectives.check_mirrored(Boundaries((999, 779, 519, 259), (19, 300, 519, 779)))
    objectives.check_mirrored(Boundaries((999, 699, 339), (19, 339, 699)))


# --- the stages on the toy base model: a chain cfg_distill -> icd -> cycle ----------------------

def toy_config(**stage_overrides):
    sets = ["train.cfg_distill.global_batch_size=8", "train.icd.global_batch_size=8", "train.cycle.global_batch_size=4"]
    return load_config("jobs/configs/toy.yaml", sets + [f"{k}={v}" for k, v in stage_overrides.items()])


def fixed_batch(model, n=8):
    specs = sample_specs(np.random.default_rng(0), n)
    pixels = torch.from_numpy(np.stack([render(s).image for s in specs])).permute(0, 3, 1, 2)
    ids = model.bundle.tokenize([s.caption for s in specs])
    return model.encode_batch({"pixels": pixels, "input_ids": ids})


def snapshot(unet):
    return {n: p.detach().clone() for n, p in unet.named_parameters()}


def train_steps(model, steps, lr, n=8):
    latents, context = fixed_batch(model, n)
    params = list(model.trainable_parameters().values())
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    for step in range(steps):
        out = model.objective(latents, context, torch.Generator().manual_seed(step % 2))
        optimizer.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if model.target is not None:
            model.target.update()
        losses.append(out["loss"].item())
    return losses


def changed(before, unet):
    return {n for n, p in unet.named_parameters() if not torch.equal(before[n], p.detach())}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Train each stage a few steps and export it, as the stages hand over to each other."""
    root = str(tmp_path_factory.mktemp("stages"))
    config = toy_config(**{"train.cfg_distill.lora": "true", "method.target_ema_decay": 0.95})
    torch.manual_seed(0)
    results, previous = {}, None
    # cycle at 1e-3: at 3e-3 its loss on the toy base v2 rose over 4 steps (0.21 -> 0.29), at 1e-3 it falls
    for stage, steps, lr in (("cfg_distill", 6, 3e-3), ("icd", 6, 3e-3), ("cycle", 4, 1e-3)):
        model = build_stage_model(stage, config, previous)
        before = snapshot(model.bundle.unet)
        losses = train_steps(model, steps, lr, n=8 if stage != "cycle" else 4)
        paths = StagePaths.of(config, stage, "unit", root)
        export_stage(model, paths.output)
        previous = make_manifest(paths, config, previous, steps, [])
        results[stage] = dict(model=model, before=before, losses=losses, manifest=previous)
    return config, results


@pytest.mark.parametrize("stage", ["cfg_distill", "icd", "cycle"])
def test_each_stage_loss_decreases_on_a_fixed_batch(chain, stage):
    losses = chain[1][stage]["losses"]
    # the draws alternate between two seeds: compare like with like
    assert losses[-2] < losses[0] and losses[-1] < losses[1], losses


def test_lora_cfg_distill_trains_only_the_adapter_and_the_w_embedding(chain):
    result = chain[1]["cfg_distill"]
    moved = changed(result["before"], result["model"].bundle.unet)
    assert moved and all("lora_" in n or "cond_proj" in n for n in moved), sorted(moved)[:5]
    assert any("cond_proj" in n for n in moved)


def test_icd_trains_both_adapters_and_nothing_else(chain):
    result = chain[1]["icd"]
    moved = changed(result["before"], result["model"].bundle.unet)
    assert all("lora_" in n for n in moved)
    assert any(f".{FORWARD}." in n for n in moved) and any(f".{REVERSE}." in n for n in moved)
    # the chain keeps an EMA target: it moves, but only through the EMA, never as a trained parameter
    targets = {n for n in moved if f".{target_name(FORWARD)}." in n or f".{target_name(REVERSE)}." in n}
    assert targets and not targets & set(result["model"].trainable_parameters())
    assert result["model"].objective.targets == {FORWARD: target_name(FORWARD), REVERSE: target_name(REVERSE)}
    assert chain[1]["cycle"]["model"].objective.targets[FORWARD] == target_name(FORWARD)


def test_cycle_never_changes_the_reverse_adapter(chain):
    result = chain[1]["cycle"]
    moved = changed(result["before"], result["model"].bundle.unet)
    forward = (f".{FORWARD}.", f".{target_name(FORWARD)}.")
    assert moved and all(n.count("lora_") and any(a in n for a in forward) for n in moved), sorted(moved)[:5]
    assert any(f".{FORWARD}." in n for n in moved)


def test_full_cfg_distill_keeps_a_frozen_teacher_and_moves_the_base_weights():
    config = toy_config()
    assert config.train.cfg_distill.lora is False
    model = build_stage_model("cfg_distill", config, None)
    teacher_before = {n: p.clone() for n, p in model.objective.teacher.named_parameters()}
    before = snapshot(model.bundle.unet)
    train_steps(model, 2, 1e-3)
    assert any("conv_in" in n or "down_blocks" in n for n in changed(before, model.bundle.unet))
    assert all(torch.equal(teacher_before[n], p) for n, p in model.objective.teacher.named_parameters())


def test_exported_stages_load_back_with_the_trained_weights(chain):
    from icd.train.stages import load_stage_bundle

    config, results = chain
    icd = results["icd"]
    loaded = load_stage_bundle(icd["manifest"])
    assert loaded.guidance_dim == config.model.guidance_embedding_dim
    trained = dict(icd["model"].bundle.unet.named_parameters())
    for name, param in loaded.unet.named_parameters():
        if "lora_" in name:
            assert torch.allclose(param, trained[name]), name
    # the cfg_distill output is a plain UNet: its LoRA folded into the weights
    distilled = load_stage_bundle(results["cfg_distill"]["manifest"])
    assert not distilled.adapters and artifact_layout("cfg_distill")["unet"] == "unet"
    assert icd["manifest"]["unet"] == results["cfg_distill"]["manifest"]["unet"]


def test_checkpoint_round_trip_restores_weights_optimizer_and_step(tmp_path, guided_tiny):
    trainable = {n: p for n, p in guided_tiny.unet.named_parameters() if "lora_" in n}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3)
    for p in trainable.values():
        p.grad = torch.ones_like(p)
    optimizer.step()
    save_checkpoint(tmp_path, trainable, optimizer, TrainState(step=7, epoch=1, resumed_from=[3]))
    saved = {n: p.detach().clone() for n, p in trainable.items()}
    with torch.no_grad():
        for p in trainable.values():
            p.add_(1.0)
    fresh = torch.optim.AdamW(trainable.values(), lr=1e-3)
    state = load_checkpoint(tmp_path, trainable, fresh)
    assert state == TrainState(step=7, epoch=1, resumed_from=[3])
    assert all(torch.equal(saved[n], p) for n, p in trainable.items())
    assert fresh.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    with pytest.raises(ValueError, match="does not match"):
        load_checkpoint(tmp_path, {"other": torch.nn.Parameter(torch.zeros(1))}, fresh)


def test_restore_from_storage_never_rewrites_files_another_worker_is_reading(tmp_path):
    """Two workers of a node resume from one checkpoint in storage. The first reads Ray's node-shared
    copy; the second's restore must neither download over it nor delete it."""
    import pyarrow.fs
    import ray.train

    trainable = {"w": torch.nn.Parameter(torch.arange(4.0))}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3)
    trainable["w"].grad = torch.ones(4)
    optimizer.step()
    save_checkpoint(tmp_path / "local", trainable, optimizer, TrainState(step=4))
    storage = pyarrow.fs._MockFileSystem()  # a non-local filesystem, as S3 is
    storage.create_dir("checkpoints/step-4")
    pyarrow.fs.copy_files(str(tmp_path / "local"), "checkpoints/step-4", destination_filesystem=storage)
    checkpoint = ray.train.Checkpoint("checkpoints/step-4", filesystem=storage)

    shared = Path(checkpoint.to_directory())  # the first worker's copy, still being read
    before = (shared / "optimizer.pt").stat()
    state = restore_checkpoint(checkpoint, trainable, torch.optim.AdamW(trainable.values(), lr=1e-3), rank=1)
    after = (shared / "optimizer.pt").stat()
    assert state.step == 4
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    torch.load(shared / "optimizer.pt", weights_only=True)  # still whole for the first worker


def test_stage_identity_follows_inputs_but_not_logging():
    base = toy_config()
    assert stage_identity(base, "cycle") == stage_identity(toy_config(**{"train.cycle.log_every": 3}), "cycle")
    changed_icd = toy_config(**{"train.icd.lr": 1e-3})
    assert stage_identity(base, "icd") != stage_identity(changed_icd, "icd")
    assert stage_identity(base, "cycle") != stage_identity(changed_icd, "cycle")  # its input changed
    assert stage_identity(base, "cfg_distill") == stage_identity(changed_icd, "cfg_distill")
    two_step = toy_config(**{"method.reverse_timesteps": "[999,499]", "method.forward_timesteps": "[19,499]"})
    assert stage_identity(base, "cfg_distill") == stage_identity(two_step, "cfg_distill")
    assert stage_identity(base, "icd") != stage_identity(two_step, "icd")
    ema = toy_config(**{"method.target_ema_decay": 0.95})
    assert stage_identity(base, "icd") != stage_identity(ema, "icd")
    assert stage_identity(base, "cfg_distill") == stage_identity(ema, "cfg_distill")


def test_preview_grid_layout_and_edit_prompts():
    from icd.train.previews import edited_caption, to_uint8_grid

    assert edited_caption("a red circle on a blue background", 0) == "a green circle on a blue background"
    assert edited_caption("a photo of a cat", 0) == "a photo of a cat"  # not a shapes caption: unchanged
    rows = [torch.full((2, 3, 4, 4), -1.0), torch.ones(2, 3, 4, 4)]
    rows[1][1, 0] = 0.0  # second image of the second row: red channel mid-grey
    grid = to_uint8_grid(rows)
    assert grid.shape == (8, 8, 3) and grid.dtype == np.uint8
    assert (grid[:4] == 0).all() and (grid[4:, :4] == 255).all()
    assert (grid[4:, 4:, 0] == 128).all() and (grid[4:, 4:, 1] == 255).all()


# --- the EMA consistency target --------------------------------------------------------------

def test_ema_update_moves_each_tensor_a_fraction_toward_the_online_one():
    target, online = [torch.tensor([0.0, 10.0]), torch.tensor([[4.0]])], [torch.tensor([1.0, 0.0]), torch.tensor([[0.0]])]
    ema_update(target, online, 0.9)
    assert torch.allclose(target[0], torch.tensor([0.1, 9.0])) and torch.allclose(target[1], torch.tensor([[3.6]]))


def adapted_tiny():
    bundle = tiny_bundle(seed=0, guidance_dim=16)
    add_adapters(bundle.unet, 4, 4, ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    return bundle


def test_ema_target_starts_as_the_online_adapters_and_follows_them_by_the_decay():
    bundle = adapted_tiny()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B is zero at init: give the adapters an effect
        for name, p in bundle.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    trainable_before = {n for n, p in bundle.unet.named_parameters() if p.requires_grad}
    target = EMATarget(bundle.unet, (FORWARD, REVERSE), 0.9)
    assert {n for n, p in bundle.unet.named_parameters() if p.requires_grad} == trainable_before
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        for adapter in (FORWARD, REVERSE):
            with bundle.adapter(adapter):
                online = bundle.eps(x, 500, context, 0.0)
            with bundle.adapter(target_name(adapter)):
                assert torch.equal(bundle.eps(x, 500, context, 0.0), online)
    params = dict(bundle.unet.named_parameters())
    name = next(n for n in params if f".{REVERSE}." in n and "lora_B" in n)
    copy_name = name.replace(f".{REVERSE}.", f".{target_name(REVERSE)}.")
    old = params[name].detach().clone()
    with torch.no_grad():
        params[name].add_(1.0)
    target.update()
    assert torch.allclose(params[copy_name], 0.9 * old + 0.1 * (old + 1.0))
    saved = {k: v.clone() for k, v in target.state_dict().items()}
    target.update()
    target.load_state_dict(saved)
    assert torch.equal(params[copy_name], saved[copy_name])
    with pytest.raises(ValueError, match="missing"):
        target.load_state_dict({})
    with pytest.raises(ValueError, match="target_ema_decay"):
        EMATarget(adapted_tiny().unet, (FORWARD,), 1.0)


def test_consistency_term_compares_against_the_named_target_adapter():
    bundle = adapted_tiny()
    EMATarget(bundle.unet, (FORWARD,), 0.5)
    with torch.no_grad():  # make the target differ from the online adapter
        for name, p in bundle.unet.named_parameters():
            if f".{target_name(FORWARD)}." in name and "lora_B" in name:
                p.add_(0.05)
    g = torch.Generator().manual_seed(4)
    x0, noise, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    t = torch.tensor([279])
    got = objectives.forward_consistency_term(bundle, x0, context, t, noise, DEFAULT, 20, 0.001, target_name(FORWARD))
    a, s = ab(279)
    x_t = a * x0 + s * noise
    with torch.no_grad():
        with bundle.adapter(FORWARD):
            student = jump_by_hand(x_t, bundle.eps(x_t, 279, context, 0.0), 279, 519)
        with bundle.adapter(None):
            x_299 = jump_by_hand(x_t, bundle.eps(x_t, 279, context, 0.0), 279, 299)
        with bundle.adapter(target_name(FORWARD)):
            expected = huber(student, jump_by_hand(x_299, bundle.eps(x_299, 299, context, 0.0), 299, 519))
        online = objectives.forward_consistency_term(bundle, x0, context, t, noise, DEFAULT, 20, 0.001)
    assert got.item() == pytest.approx(expected, rel=1e-4)
    assert online.item() != pytest.approx(expected, rel=1e-3)


def test_checkpoint_round_trip_restores_the_ema_target(tmp_path):
    bundle = adapted_tiny()
    target = EMATarget(bundle.unet, (FORWARD, REVERSE), 0.9)
    trainable = {n: p for n, p in bundle.unet.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3)
    with torch.no_grad():
        for p in trainable.values():
            p.add_(1.0)
    target.update()
    save_checkpoint(tmp_path, trainable, optimizer, TrainState(step=1), target)
    saved = {k: v.clone() for k, v in target.state_dict().items()}
    target.update()
    assert not all(torch.equal(saved[k], v) for k, v in target.state_dict().items())
    load_checkpoint(tmp_path, trainable, optimizer, target)
    assert all(torch.equal(saved[k], v) for k, v in target.state_dict().items())
    (tmp_path / "target.safetensors").unlink()
    with pytest.raises(ValueError, match="target_ema_decay"):
        load_checkpoint(tmp_path, trainable, optimizer, target)


def test_cycle_runs_its_frozen_decoder_fused_with_the_same_loss_and_gradients():
    from peft.tuners.tuners_utils import BaseTunerLayer

    from icd.losses.cycle import PatchLPIPS

    bundle = adapted_tiny()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in bundle.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    for name, p in bundle.unet.named_parameters():  # as the cycle stage sets it: the forward adapter only
        p.requires_grad_(f".{FORWARD}." in name and "lora_" in name)
    method = load_config("jobs/configs/toy.yaml", ["method.lambda_forward=1.0"]).method
    boundaries = Boundaries.from_config(method)
    lpips = PatchLPIPS(pretrained_backbone=False)
    fused = objectives.CycleObjective(bundle, boundaries, method, lpips)
    unfused = objectives.CycleObjective(bundle, boundaries, method, lpips, fuse_decoder=False)
    assert unfused.decoder is None
    assert not any(isinstance(m, BaseTunerLayer) for m in fused.decoder.unet.modules())
    x0, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    results = []
    for objective in (fused, unfused):
        bundle.unet.zero_grad(set_to_none=True)
        out = objective(x0, context, torch.Generator().manual_seed(3))
        out["loss"].backward()
        results.append((out, {n: p.grad.clone() for n, p in bundle.unet.named_parameters() if p.grad is not None}))
    (out_f, grads_f), (out_u, grads_u) = results
    assert set(out_f) == set(out_u) >= {"cycle", "cd_forward", "preservation_forward"}
    for key in out_u:
        assert out_f[key].item() == pytest.approx(out_u[key].item(), rel=1e-4, abs=1e-7), key
    assert grads_f.keys() == grads_u.keys() and grads_u and all(f".{FORWARD}." in n for n in grads_u)
    scale = max(g.abs().max().item() for g in grads_u.values())
    # Through 13 UNet passes and LPIPS these gradients are ill-conditioned in fp32: the *same*
    # unfused computation on 1 and on 2 threads differs by 3e-3 (relative norm), and fused weights
    # (W + BA) round differently again (measured 2.4e-4 on 1 thread, 2.8e-3 on 2). A decoder
    # without its adapter or with the wrong LoRA scale is off by O(1).
    worst = max((grads_f[n] - grads_u[n]).abs().max().item() for n in grads_u)
    difference = sum((grads_f[n] - grads_u[n]).pow(2).sum() for n in grads_u).sqrt()
    norm = sum(grads_u[n].pow(2).sum() for n in grads_u).sqrt()
    assert worst <= 1e-2 * scale and difference <= 1e-2 * norm, (worst, scale, (difference / norm).item())
    assert fused.decoder.unet is not bundle.unet and not any(p.requires_grad for p in fused.decoder.unet.parameters())


def adapter_of(name: str) -> str | None:
    return next((a for a in (FORWARD, REVERSE) if f".{a}." in name), None)


@pytest.mark.parametrize("term, adapter", [("cd_reverse", REVERSE), ("cd_forward", FORWARD),
                                           ("preservation_forward", FORWARD), ("preservation_reverse", REVERSE)])
def test_each_icd_term_alone_has_gradients_on_its_own_adapter_only(chain, term, adapter):
    config, results = chain
    model = build_stage_model("icd", config, results["cfg_distill"]["manifest"])
    trainable = model.trainable_parameters()
    latents, context = fixed_batch(model, 4)
    out = model.objective(latents, context, torch.Generator().manual_seed(0), term=term)
    out["loss"].backward()
    with_grad = {adapter_of(n) for n, p in trainable.items() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {adapter}
    weight = getattr(config.method, f"lambda_{term.removeprefix('preservation_')}") if "preservation" in term else 1
    assert torch.allclose(out["loss"].detach(), weight * out[term])


def test_step_per_term_takes_one_optimizer_step_per_term(chain):
    from icd.train.loop import train_step
    from icd.train.optimization import build_optimizer

    config, results = chain
    steps_taken = {}
    for per_term in (False, True):
        torch.manual_seed(0)
        model = build_stage_model("icd", config, results["cfg_distill"]["manifest"])
        trainable = model.trainable_parameters()
        optimizer, schedule = build_optimizer(trainable.values(), config.train.icd)
        latents, context = fixed_batch(model, 4)
        terms = model.objective.term_names() if per_term else None
        out, norm = train_step(model.objective, latents, context, torch.Generator().manual_seed(0), optimizer,
                               trainable, 1.0, schedule, terms=terms)
        steps_taken[per_term] = {adapter_of(n): int(optimizer.state[p]["step"]) for n, p in trainable.items()}
        assert norm.ndim == 0 and float(norm) > 0
        assert {"cd_reverse", "cd_forward", "preservation_forward", "preservation_reverse"} <= set(out)
        assert schedule.last_epoch == 1  # the schedule advances once per training step either way
    assert steps_taken[False] == {FORWARD: 1, REVERSE: 1}
    # reverse CD then Lr on the reverse adapter, forward CD then Lf on the forward one
    assert steps_taken[True] == {FORWARD: 2, REVERSE: 2}
    assert model.objective.term_names() == ["cd_reverse", "cd_forward", "preservation_forward",
                                            "preservation_reverse"]


def test_cycle_step_per_term_steps_the_forward_adapter_once_per_term(chain):
    from icd.train.loop import train_step
    from icd.train.optimization import build_optimizer

    config, results = chain
    model = build_stage_model("cycle", config, results["icd"]["manifest"])
    trainable = model.trainable_parameters()
    optimizer, schedule = build_optimizer(trainable.values(), config.train.cycle)
    latents, context = fixed_batch(model, 2)
    terms = model.objective.term_names()
    assert terms == ["cycle", "cd_forward", "preservation_forward"]
    out, _ = train_step(model.objective, latents, context, torch.Generator().manual_seed(0), optimizer, trainable,
                        1.0, schedule, terms=terms)
    assert {adapter_of(n) for n in trainable} == {FORWARD}
    assert {int(optimizer.state[p]["step"]) for p in trainable.values()} == {3}
    assert set(terms) <= set(out)
    with pytest.raises(ValueError, match="Lr does not apply"):
        model.objective(latents, context, None, term="preservation_reverse")
