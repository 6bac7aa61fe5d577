import math

import numpy as np
import pytest

from icd.data.shapes import (COLORS, SHAPES, ShapeSpec, coverage, edit_spec, nearest_color, parse_caption,
                             random_sample, render, sample_spec)
from icd.evaluation.shapes import background_color, shape_region_color


def test_same_seed_same_image():
    a, b = random_sample(123), random_sample(123)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert a.image.shape == (32, 32, 3) and a.image.dtype == np.uint8 and a.mask.shape == (32, 32)


def test_spec_ranges_over_many_draws():
    rng = np.random.default_rng(0)
    specs = [sample_spec(rng) for _ in range(2000)]
    assert all(0.2 <= s.cx <= 0.8 and 0.2 <= s.cy <= 0.8 and 0.15 <= s.radius <= 0.30 for s in specs)
    assert all(s.color != s.background for s in specs)
    assert {s.shape for s in specs} == set(SHAPES) and {s.color for s in specs} == set(COLORS)


@pytest.mark.parametrize("shape, area", [
    ("circle", lambda r: math.pi * r * r),
    ("square", lambda r: 2 * r * r),  # circumradius r: side r * sqrt(2)
    ("triangle", lambda r: 3 * math.sqrt(3) / 4 * r * r),
    ("star", lambda r: 10 * 0.5 * r * (0.45 * r) * math.sin(math.radians(36))),
])
def test_shape_areas_match_geometry(shape, area):
    spec = ShapeSpec("red", shape, "blue", 0.5, 0.5, 0.25, 0.3)
    measured = coverage(spec).sum() / 32 ** 2
    # PIL's polygon fill includes its edge pixels at 128 px: ~5 % more area for the polygons.
    assert measured == pytest.approx(area(0.25), rel=0.06)


def test_colours_mask_and_caption():
    spec = ShapeSpec("yellow", "circle", "purple", 0.5, 0.5, 0.25, 0.0)
    sample = render(spec)
    assert sample.caption == "a yellow circle on a purple background"
    assert tuple(sample.image[16, 16]) == COLORS["yellow"] and tuple(sample.image[0, 0]) == COLORS["purple"]
    # An independent mask: pixel centres inside the circle.
    yy, xx = np.mgrid[0:32, 0:32] + 0.5
    inside = (xx - 16) ** 2 + (yy - 16) ** 2 <= 8 ** 2
    assert (inside == sample.mask).mean() > 0.97
    # Antialiased edge: some pixels are blends of the two colours.
    assert len({tuple(p) for p in sample.image.reshape(-1, 3)}) > 2


def test_caption_parsing_and_bad_specs():
    assert parse_caption("a red star on a white background") == ("red", "star", "white")
    assert parse_caption("a photo of a cat") is None
    with pytest.raises(ValueError, match="equals background"):
        ShapeSpec("red", "star", "red", 0.5, 0.5, 0.2, 0.0)
    with pytest.raises(ValueError, match="unknown shape"):
        ShapeSpec("red", "hexagon", "blue", 0.5, 0.5, 0.2, 0.0)


def test_edit_swaps_exactly_one_word_and_keeps_geometry():
    rng = np.random.default_rng(3)
    for _ in range(200):
        spec = sample_spec(rng)
        target, attribute = edit_spec(spec, rng)
        changed = [k for k in ("color", "shape", "background") if getattr(spec, k) != getattr(target, k)]
        assert changed == [attribute]
        assert (target.cx, target.cy, target.radius) == (spec.cx, spec.cy, spec.radius)
        assert target.color != target.background


def test_shape_region_colour_reads_rendered_images():
    rng = np.random.default_rng(4)
    hits = [shape_region_color(render(s).image, s.background) == s.color for s in (sample_spec(rng) for _ in range(200))]
    assert np.mean(hits) == 1.0
    flat = np.zeros((32, 32, 3), np.uint8) + np.array(COLORS["blue"], np.uint8)
    assert shape_region_color(flat, "blue") is None
    assert nearest_color((230, 50, 50)) == "red"


def test_background_color_reads_rendered_images_back():
    rng = np.random.default_rng(1)
    samples = [render(sample_spec(rng)) for _ in range(200)]
    assert all(background_color(s.image) == s.spec.background for s in samples)
    flipped = samples[0].image.copy()
    flipped[:, :] = COLORS["white" if samples[0].spec.background != "white" else "black"]
    assert background_color(flipped) != samples[0].spec.background
