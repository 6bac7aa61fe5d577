"""What training jobs show a person: progress lines, labelled previews, no known library warnings."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from icd.train.previews import LABEL_WIDTH, MIN_TILE, labelled_grid
from icd.train.progress import eta_s, format_duration, progress_line, quiet_data_progress

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def test_durations_eta_and_the_progress_line():
    assert [format_duration(s) for s in (0, 12.4, 247, 3 * 3600 + 5 * 60 + 7)] == ["0s", "12s", "4m07s", "3h05m"]
    assert eta_s(45, 120, timed_steps=44, timed_s=88.0) == pytest.approx(150.0)  # 75 steps at 2 s each
    assert eta_s(1, 120, timed_steps=0, timed_s=0.0) is None
    line = progress_line("icd", 45, 120, 0.08412, 7.6234, 192.0, 320.0)
    assert line == "icd  step  45/120  loss 0.08412  7.62 samples/s  elapsed 3m12s  ETA 5m20s"
    assert progress_line("cycle", 1, 45, 1.0, 0.0, 3.0, None).endswith("ETA ?")


def test_training_drivers_turn_ray_data_progress_off():
    from ray.data import DataContext

    context = DataContext.get_current()
    saved = context.enable_progress_bars, context.enable_operator_progress_bars
    try:
        context.enable_progress_bars = context.enable_operator_progress_bars = True
        quiet_data_progress()
        assert not context.enable_progress_bars and not context.enable_operator_progress_bars
    finally:
        context.enable_progress_bars, context.enable_operator_progress_bars = saved


def test_previews_are_upscaled_nearest_with_labels_and_prompts():
    torch.manual_seed(0)
    rows = [torch.rand(3, 3, 32, 32) * 2 - 1 for _ in range(4)]
    captions = ["a red circle on a blue background"] * 3
    targets = ["a green circle on a blue background"] * 3
    grid = labelled_grid(rows, ["generation", "input", "reconstruction", "edit"], captions, targets)
    scale = MIN_TILE // 32
    assert grid.shape[1] == LABEL_WIDTH + 3 * MIN_TILE and grid.shape[0] > 4 * MIN_TILE and grid.dtype == np.uint8
    # tile (row 1, column 2) is the input image, each pixel a scale x scale block
    small = ((rows[1][2].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    tile = grid[MIN_TILE:2 * MIN_TILE, LABEL_WIDTH + 2 * MIN_TILE:LABEL_WIDTH + 3 * MIN_TILE]
    assert np.array_equal(tile, np.repeat(np.repeat(small, scale, 0), scale, 1))
    # row labels drawn in the label column, prompts below the tiles
    assert (grid[:4 * MIN_TILE, :LABEL_WIDTH] < 128).any()
    assert (grid[4 * MIN_TILE:, :] < 128).any()


def _peft_warnings(caught) -> list:
    return [w for w in caught if "Already found a `peft_config` attribute" in str(w.message)]


def test_two_adapters_on_one_unet_raise_no_peft_warning():
    from icd.models.adapters import add_adapters
    from icd.models.toy import tiny_bundle

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        add_adapters(tiny_bundle(seed=1).unet, 4, 4, TARGETS)
    assert not _peft_warnings(caught)
    # PEFT does warn for a second adapter added directly: the filter above is what removes it
    from icd.models.adapters import lora_config

    unet = tiny_bundle(seed=1).unet
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unet.add_adapter(lora_config(4, 4, TARGETS), adapter_name="a")
        unet.add_adapter(lora_config(4, 4, TARGETS), adapter_name="b")
    assert _peft_warnings(caught)


def test_lpips_is_built_without_torchvision_deprecation_warnings():
    from icd.losses.cycle import PatchLPIPS

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PatchLPIPS(pretrained_backbone=False)
    assert not [w for w in caught if "pretrained" in str(w.message) or "weight enum" in str(w.message)], \
        [str(w.message) for w in caught]


def test_experiments_are_created_and_marked_as_training_experiments(tmp_path):
    import mlflow

    from icd.train.tracking import EXPERIMENT_KIND_TAG, TRAINING_KIND, training_experiment

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    made = training_experiment(client, "icd-new")
    assert client.get_experiment(made).tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    old = client.create_experiment("icd-old")  # as mlflow.set_experiment leaves one: no kind
    assert training_experiment(client, "icd-old") == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
