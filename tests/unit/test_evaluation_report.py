"""The evaluation table: every column for the DDIM teacher and a consistency model, CSV and PNG."""

import numpy as np
import torch

from icd.config import EditingConfig
from icd.data.shapes import random_sample
from icd.diffusion.boundaries import Boundaries
from icd.evaluation.report import COLUMNS, caption_accuracy, evaluate, table_csv, table_png
from icd.losses.cycle import PatchLPIPS
from icd.models.adapters import add_adapters
from icd.models.toy import tiny_bundle


def test_both_kinds_fill_every_column_with_their_nfe():
    bundle = tiny_bundle(seed=0, guidance_dim=16)
    add_adapters(bundle.unet, 4, 4, ["to_q", "to_v"])
    samples = [random_sample(s) for s in range(4)]
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    captions = [s.caption for s in samples]
    lpips = PatchLPIPS(pretrained_backbone=False)
    boundaries = Boundaries((999, 779, 519, 259), (19, 259, 519, 779))
    rows = {"ddim2": evaluate(bundle, "ddim", images, captions, EditingConfig(), lpips, ddim_steps=2),
            "icd": evaluate(bundle, "consistency", images, captions, EditingConfig(), lpips, boundaries)}
    assert set(rows["icd"]) == set(COLUMNS)
    assert (rows["ddim2"]["reconstruction_nfe"], rows["ddim2"]["edit_nfe"]) == (4, 4)
    assert (rows["icd"]["reconstruction_nfe"], rows["icd"]["edit_nfe"]) == (8, 8)
    assert all(0 <= rows["icd"][k] <= 1 for k in ("inplace_success", "edit_success", "shape_iou", "caption_accuracy", "shape_accuracy"))
    csv = table_csv(rows, lpips.name)
    assert csv.splitlines()[0].startswith("model,mse,psnr,psnr_pooled,lpips_randvgg,") and len(csv.splitlines()) == 3
    assert table_png(rows, lpips.name)[:8] == b"\x89PNG\r\n\x1a\n"


def test_caption_accuracy_reads_the_colour_back():
    samples = [random_sample(s) for s in range(5)]
    by_caption = {s.caption: s.image for s in samples}

    def oracle(prompts):
        return torch.from_numpy(np.stack([by_caption[p] for p in prompts])).permute(0, 3, 1, 2).float() / 127.5 - 1

    assert caption_accuracy(oracle, [s.caption for s in samples]) == 1.0
    blank = lambda prompts: torch.zeros(len(prompts), 3, 32, 32)  # noqa: E731 (grey: never the caption's colour)
    assert caption_accuracy(blank, [s.caption for s in samples]) == 0.0


def test_shape_accuracy_reads_the_shape_back_and_is_independent_of_colour():
    import dataclasses

    from icd.data.shapes import SHAPES, render
    from icd.evaluation.report import generation_metrics

    samples = [random_sample(s) for s in range(8)]
    by_caption = {s.caption: s.spec for s in samples}

    def draw(prompts, shift):  # the caption's colour and place, the shape `shift` places further in SHAPES
        specs = [by_caption[p] for p in prompts]
        specs = [dataclasses.replace(s, shape=SHAPES[(SHAPES.index(s.shape) + shift) % len(SHAPES)]) for s in specs]
        images = np.stack([render(s).image for s in specs])
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1

    captions = [s.caption for s in samples]
    assert generation_metrics(lambda p: draw(p, 0), captions) == {"caption_accuracy": 1.0, "shape_accuracy": 1.0}
    assert generation_metrics(lambda p: draw(p, 1), captions) == {"caption_accuracy": 1.0, "shape_accuracy": 0.0}


def test_real_photo_captions_get_the_reconstruction_columns_only():
    """LAION-style captions: no shapes-world edit to score, so no edit or caption columns (not a crash)."""
    from icd.evaluation.report import SHAPES_WORLD_COLUMNS, is_shapes_world

    bundle = tiny_bundle(seed=0, guidance_dim=16)
    add_adapters(bundle.unet, 4, 4, ["to_q", "to_v"])
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    captions = ["a dog on a beach at sunset", "portrait of an old man, oil painting", "a red circle on a blue background"]
    assert not is_shapes_world(captions) and is_shapes_world(captions[2:])
    lpips = PatchLPIPS(pretrained_backbone=False)
    boundaries = Boundaries((999, 779, 519, 259), (19, 259, 519, 779))
    row = evaluate(bundle, "consistency", images, captions, EditingConfig(), lpips, boundaries)
    assert set(row) == set(COLUMNS) - set(SHAPES_WORLD_COLUMNS) and row["reconstruction_nfe"] == 8
    shapes = [random_sample(s) for s in range(2)]
    shapes_images = torch.from_numpy(np.stack([s.image for s in shapes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    rows = {"laion": row, "shapes": evaluate(bundle, "consistency", shapes_images, [s.caption for s in shapes],
                                             EditingConfig(), lpips, boundaries)}
    header, laion, _ = table_csv(rows, lpips.name).splitlines()
    assert header.split(",")[5] == "inplace_success" and laion.split(",")[5] == ""  # a blank cell, not a crash
    assert table_png(rows, lpips.name)[:8] == b"\x89PNG\r\n\x1a\n"
