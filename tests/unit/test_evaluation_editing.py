"""Editing metrics on rendered shapes: a perfect edit, a no-op, a moved shape, a recoloured background."""

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
    assert perfect == {"inplace_success": 1.0, "shape_iou": 1.0, "background_psnr": 100.0, "edit_success": 1.0}
    unchanged = edit_scores(sample.image, sample.image, edit)
    assert unchanged["inplace_success"] == 0.0 and unchanged["edit_success"] == 0.0
    assert unchanged["shape_iou"] == 1.0


@pytest.mark.parametrize("seed", range(40))
def test_every_perfect_colour_edit_is_in_place(seed):
    """The renderer's perfect edit (the same ShapeSpec, colour swapped) over many geometries and palettes."""
    spec = random_sample(100 + seed).spec
    for target in [c for c in ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
                   if c not in (spec.color, spec.background)]:
        scores = edit_scores(render(spec).image, render(dataclasses.replace(spec, color=target)).image,
                             ColorEdit(spec.caption, "", target, spec.background))
        assert scores["inplace_success"] == 1.0 and scores["shape_iou"] >= 0.95, (spec, target, scores)


def test_a_shape_moved_by_a_third_of_the_image_is_not_in_place():
    """The target colour, the right shape, but elsewhere: edit_success is fooled, the in-place metrics are not."""
    fooled = 0
    for seed in range(20):
        spec = dataclasses.replace(random_sample(200 + seed).spec, cx=0.3, radius=0.2)
        target = next(c for c in ("blue", "yellow", "green") if c not in (spec.color, spec.background))
        moved = render(dataclasses.replace(spec, color=target, cx=spec.cx + 1 / 3)).image
        scores = edit_scores(render(spec).image, moved, ColorEdit(spec.caption, "", target, spec.background))
        assert scores["shape_iou"] < 0.5 and scores["inplace_success"] == 0.0 and scores["background_psnr"] < 25
        fooled += scores["edit_success"]
    assert fooled == 20


def test_a_recoloured_background_is_caught_by_background_psnr():
    spec = random_sample(9).spec
    target = next(c for c in ("blue", "yellow", "green") if c not in (spec.color, spec.background))
    new_background = next(c for c in ("white", "black", "red") if c not in (spec.color, spec.background, target))
    edited = render(dataclasses.replace(spec, color=target, background=new_background)).image
    scores = edit_scores(render(spec).image, edited, ColorEdit(spec.caption, "", target, spec.background))
    assert scores["background_psnr"] < 12 and scores["inplace_success"] == 1.0


def test_a_half_recoloured_shape_is_not_an_in_place_edit():
    sample = dataclasses.replace(random_sample(11).spec, cx=0.5, cy=0.5, radius=0.28, shape="circle")
    source = render(sample)
    target = next(c for c in ("blue", "yellow", "green") if c not in (sample.color, sample.background))
    edited = source.image.copy()
    target_image = render(dataclasses.replace(sample, color=target)).image
    edited[:, 16:] = target_image[:, 16:]  # only the right half changed
    scores = edit_scores(source.image, edited, ColorEdit(sample.caption, "", target, sample.background))
    assert scores["inplace_success"] == 0.0 and scores["shape_iou"] > 0.95


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
    assert metrics["inplace_success"] == 1.0 and metrics["edit_success"] == 1.0 and metrics["edits"] == 6
    assert metrics["shape_iou"] > 0.95
    identity = editing_metrics(lambda b, s, t: b, images, captions)
    assert identity["edit_success"] == 0.0 and identity["background_psnr"] == 100.0
    assert color_edits(["a photo of a cat"]) == [None]
