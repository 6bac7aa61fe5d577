"""train.<stage>.export: best_validation: which weights are kept, how the choice is configured and hashed."""

from __future__ import annotations

import pytest
import torch

from icd.config import ConfigError, load_config
from icd.train.checkpointing import TrainState, load_checkpoint, save_checkpoint
from icd.train.stages import stage_identity
from icd.train.validation import BestWeights, selects_best

LAST = ["train.icd.export=last", "train.cycle.export=last"]
BEST = [*LAST, "data.validation_dataset=shapes-val", "train.icd.export=best_validation"]


def params(value: float) -> dict[str, torch.nn.Parameter]:
    return {"a.lora_A.weight": torch.nn.Parameter(torch.full((2, 3), value)),
            "a.lora_B.weight": torch.nn.Parameter(torch.full((3, 2), -value))}


def test_the_best_weights_are_the_highest_scoring_checkpoints_and_come_back_after_training_moves_on():
    trainable, best = params(0.0), BestWeights()
    for step, score in ((30, 20.1), (60, 22.5), (90, float("nan")), (120, 22.5), (150, 19.0)):
        with torch.no_grad():
            for p in trainable.values():
                p.fill_(float(step))  # "training" moved the weights
        best.offer(step, score, trainable)
    assert (best.step, best.score) == (60, 22.5)  # NaN never wins, a tie keeps the earlier
    best.load_into(trainable)
    assert torch.equal(trainable["a.lora_A.weight"], torch.full((2, 3), 60.0))
    assert torch.equal(trainable["a.lora_B.weight"], torch.full((3, 2), 60.0))
    # a copy, not a view: moving the weights again does not move the kept ones
    with torch.no_grad():
        trainable["a.lora_A.weight"].fill_(1.0)
    assert torch.equal(best.weights["a.lora_A.weight"], torch.full((2, 3), 60.0))


def test_a_resumed_run_takes_the_best_weights_from_the_restored_checkpoint_or_fetches_them():
    trainable, fetched = params(3.0), []

    def fetch(step):
        fetched.append(step)
        return {name: torch.full_like(p, float(step)) for name, p in trainable.items()}

    same = BestWeights.resumed(90, 22.5, 90, trainable, fetch)
    assert fetched == [] and torch.equal(same.weights["a.lora_A.weight"], torch.full((2, 3), 3.0))
    earlier = BestWeights.resumed(60, 22.5, 90, trainable, fetch)
    assert fetched == [60] and (earlier.step, earlier.score) == (60, 22.5)
    earlier.load_into(trainable)
    assert torch.equal(trainable["a.lora_B.weight"], torch.full((3, 2), 60.0))


def test_the_best_step_survives_a_checkpoint_round_trip(tmp_path):
    trainable = params(1.0)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3)
    save_checkpoint(tmp_path, trainable, optimizer, TrainState(step=90, best_step=60, best_score=22.5))
    state = load_checkpoint(tmp_path, params(0.0), torch.optim.AdamW(params(0.0).values(), lr=1e-3))
    assert (state.step, state.best_step, state.best_score) == (90, 60, 22.5)
    # written before the field existed: no best yet
    (tmp_path / "state.json").write_text('{"step": 30, "epoch": 0, "resumed_from": []}')
    state = load_checkpoint(tmp_path, params(0.0), torch.optim.AdamW(params(0.0).values(), lr=1e-3))
    assert state.best_step is None and state.best_score is None


def test_best_validation_needs_a_validation_split_and_a_stage_that_reconstructs():
    assert selects_best(load_config("jobs/configs/toy.yaml", BEST), "icd")
    assert not selects_best(load_config("jobs/configs/toy.yaml", BEST), "cycle")
    toy, sd15 = load_config("jobs/configs/toy.yaml"), load_config("jobs/configs/sd15.yaml")
    assert [selects_best(toy, stage) for stage in ("cfg_distill", "icd", "cycle")] == [False, True, True]
    assert toy.data.validation_dataset == "shapes-val"
    assert not any(selects_best(sd15, stage) for stage in ("cfg_distill", "icd", "cycle"))  # the paper's last step
    with pytest.raises(ConfigError, match=r"train.icd.export is best_validation but data.validation_dataset"):
        load_config("jobs/configs/toy.yaml", ["data.validation_dataset=null"])
    with pytest.raises(ConfigError, match=r"train.cfg_distill.export: best_validation"):
        load_config("jobs/configs/toy.yaml", ["data.validation_dataset=shapes-val",
                                              "train.cfg_distill.export=best_validation"])
    with pytest.raises(ConfigError, match="export"):
        load_config("jobs/configs/toy.yaml", ["train.icd.export=best"])


def named_sets() -> list[str]:
    return [*LAST, "data.validation_dataset=shapes-val"]


def test_the_validation_split_is_hashed_only_into_stages_that_choose_by_it():
    last = load_config("jobs/configs/toy.yaml", [*LAST, "data.validation_dataset=null"])
    named = load_config("jobs/configs/toy.yaml", [*LAST, "data.validation_dataset=shapes-val"])
    # exporting the last step: the split, its size and the cadence do not change what is exported
    assert stage_identity(last, "icd") == stage_identity(named, "icd")
    assert stage_identity(named, "icd") == stage_identity(
        load_config("jobs/configs/toy.yaml", [*named_sets(), "train.icd.validation_count=8"]), "icd")
    best = load_config("jobs/configs/toy.yaml", BEST)
    assert stage_identity(best, "icd") != stage_identity(named, "icd")
    assert stage_identity(best, "cfg_distill") == stage_identity(named, "cfg_distill")
    assert stage_identity(best, "cycle") != stage_identity(named, "cycle")  # through its icd input
    for changed in ("data.validation_dataset=other-val", "train.icd.validation_count=8",
                    "train.icd.checkpoint_every=45"):  # the candidates and how they are scored
        assert stage_identity(load_config("jobs/configs/toy.yaml", [*BEST, changed]), "icd") != \
            stage_identity(best, "icd"), changed


def test_the_validator_scores_the_mean_per_image_psnr_of_the_4_step_reconstruction_and_keeps_train_mode(tmp_path):
    import numpy as np

    from icd.data.shapes import VALIDATION_SEED_OFFSET, random_sample
    from icd.diffusion import samplers
    from icd.diffusion.boundaries import Boundaries
    from icd.models.bundle import REVERSE
    from icd.train.stages import export_untrained, load_stage_bundle
    from icd.train.validation import Validator

    config = load_config("jobs/configs/toy.yaml")
    bundle = load_stage_bundle(export_untrained(config, "validate", str(tmp_path)))
    samples = [random_sample(VALIDATION_SEED_OFFSET + i) for i in range(8)]
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    captions = [s.caption for s in samples]
    boundaries = Boundaries.from_config(config.method)
    validator = Validator(images, captions, boundaries, seed=3)

    def by_hand() -> float:  # invert, decode, then 10 log10(1 / MSE) of each image in [0, 1], averaged
        out = samplers.reconstruct(bundle, captions, boundaries, images=images,
                                   generator=torch.Generator().manual_seed(3))
        a = ((out.images.clamp(-1, 1) + 1) / 2).double().numpy()
        b = ((images + 1) / 2).double().numpy()
        return float(np.mean([10 * np.log10(1 / np.mean((x - y) ** 2)) for x, y in zip(a, b)]))

    bundle.unet.train()
    untrained = validator.score(bundle)
    assert bundle.unet.training  # the loop goes on training after scoring
    assert untrained == pytest.approx(by_hand(), abs=1e-3)
    with torch.no_grad():  # damage the decoder: the score must fall
        generator = torch.Generator().manual_seed(0)
        for name, param in bundle.unet.named_parameters():
            if f"lora_B.{REVERSE}." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    assert validator.score(bundle) < untrained - 1.0
