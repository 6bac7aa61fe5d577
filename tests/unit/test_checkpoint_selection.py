"""train.<stage>.export: best_validation: which weights are kept, how the choice is configured and hashed."""

from __future__ import annotations

import math

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
    assert math.isinf(BestWeights().score)
