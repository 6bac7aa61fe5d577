"""Editing metrics on rendered shapes: a perfect edit, a no-op, a shifted shape."""

import dataclasses

import numpy as np
import pytest
import torch

from icd.data.shapes import random_sample, render
from icd.evaluation.editing import ColorEdit, color_edits, dilate, edit_scores, editing_metrics


def test_a_perfect_colour_edit_scores_full_marks_and_a_no_op_fails():
    sample = random_sample(3)
    spec = sample.spec
    target = next(c for c in ("blue", "yellow", "green") if c not in (spec.color, spec.background))
    edited = render(dataclasses.replace(spec, color=target)).image
    edit = ColorEdit(spec.caption, "", target, spec.background)
    perfect = edit_scores(sample.image, edited, edit)
    assert perfect == {"success": 1.0, "background_psnr": 100.0, "mask_iou": 1.0}
    unchanged = edit_scores(sample.image, sample.image, edit)
    assert unchanged["success"] == 0.0 and unchanged["mask_iou"] == 1.0


def test_moving_the_shape_costs_iou_and_background_psnr():
    spec = random_sample(5).spec
    source = render(spec).image
    moved = render(dataclasses.replace(spec, cx=min(0.8, spec.cx + 0.2))).image
    scores = edit_scores(source, moved, ColorEdit(spec.caption, "", spec.color, spec.background))
    assert scores["mask_iou"] < 0.6 and scores["background_psnr"] < 20


def test_background_psnr_is_over_pixels_outside_the_dilated_mask():
    spec = random_sample(7).spec
    source = render(spec).image
    noisy = source.copy()
    noisy[0, 0] = np.clip(noisy[0, 0].astype(int) + 51, 0, 255)  # a corner pixel: background
    scores = edit_scores(source, noisy, ColorEdit(spec.caption, "", spec.color, spec.background))
    changed = (np.clip(source[0, 0].astype(int) + 51, 0, 255) - source[0, 0].astype(int)) / 255.0
    from icd.evaluation.shapes import shape_region

    n_background = (~dilate(shape_region(source, spec.background))).sum()
    expected = 10 * np.log10(1 / ((changed ** 2).sum() / (3 * n_background)))
    assert scores["background_psnr"] == pytest.approx(expected, rel=1e-6)


def test_editing_metrics_runs_an_edit_function_over_colour_swaps():
    samples = [random_sample(s) for s in range(6)]
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    captions = [s.caption for s in samples]
    edits = color_edits(captions)
    by_prompt = {e.target_prompt: e for e in edits}

    def oracle(batch, sources, targets):  # renders the target exactly
        out = []
        for source_prompt, target_prompt in zip(sources, targets):
            spec = next(s.spec for s in samples if s.caption == source_prompt)
            out.append(render(dataclasses.replace(spec, color=by_prompt[target_prompt].target_color)).image)
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1

    metrics = editing_metrics(oracle, images, captions, batch_size=4)
    # edge pixels of a recoloured shape cross the region threshold differently: IoU just under 1
    assert metrics["edit_success"] == 1.0 and metrics["mask_iou"] > 0.95 and metrics["edits"] == 6
    identity = editing_metrics(lambda b, s, t: b, images, captions)
    assert identity["edit_success"] == 0.0 and identity["background_psnr"] == 100.0
    assert color_edits(["a photo of a cat"]) == [None]
