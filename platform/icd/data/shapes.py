"""The shapes world: the toy preset's synthetic images, specified so anyone can regenerate them.

A 32x32 RGB image holds one filled shape on a plain background. It is drawn at 128x128 and
downsampled with a box filter (antialiased edges). Caption: "a {color} {shape} on a
{background} background". The shape mask is the downsampled coverage >= 0.5.

A `ShapeSpec` fixes everything about an image, so an edit (one word swapped) can be
rendered with the same geometry: the exact ground truth of a perfect edit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 60, 180),
    "orange": (250, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
IMAGE_SIZE = 32
# The held-out split's first seed: jobs/make_shards.py writes <name>-eval from EVAL_SEED_OFFSET + seed on.
EVAL_SEED_OFFSET = 1_500_000_000
# The validation split's (<name>-val, which chooses checkpoints): as far from both as the eval split is from training.
VALIDATION_SEED_OFFSET = 1_750_000_000
DRAW_SIZE = 128
STAR_INNER_RATIO = 0.45


@dataclass(frozen=True)
class ShapeSpec:
    """Everything that determines one image. Lengths are fractions of the image side."""

    color: str
    shape: str
    background: str
    cx: float
    cy: float
    radius: float  # outer radius
    rotation: float  # radians; ignored for circles

    def __post_init__(self):
        if self.color not in COLORS or self.background not in COLORS:
            raise ValueError(f"unknown colour in {self}; expected one of {sorted(COLORS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.color == self.background:
            raise ValueError(f"shape colour equals background colour ({self.color})")

    @property
    def caption(self) -> str:
        return caption(self.color, self.shape, self.background)


@dataclass(frozen=True)
class ShapeSample:
    spec: ShapeSpec
    image: np.ndarray  # (32, 32, 3) uint8
    mask: np.ndarray  # (32, 32) bool, the shape's pixels

    @property
    def caption(self) -> str:
        return self.spec.caption


def caption(color: str, shape: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def parse_caption(text: str) -> tuple[str, str, str] | None:
    """(color, shape, background) of a shapes-world caption, or None if it is not one."""
    words = text.strip().split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        return None
    color, shape, background = words[1], words[2], words[5]
    if color in COLORS and background in COLORS and shape in SHAPES:
        return color, shape, background
    return None


def sample_spec(rng: np.random.Generator, color: str | None = None, shape: str | None = None,
                background: str | None = None) -> ShapeSpec:
    """Draw a spec: centre uniform in the middle 60 % of each axis, radius 15-30 % of the side."""
    names = list(COLORS)
    color = color or names[rng.integers(len(names))]
    if background is None:
        others = [c for c in names if c != color]
        background = others[rng.integers(len(others))]
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    cx, cy = rng.uniform(0.2, 0.8, size=2)
    radius = rng.uniform(0.15, 0.30)
    rotation = rng.uniform(0.0, 2 * math.pi) if shape != "circle" else 0.0
    return ShapeSpec(color, shape, background, float(cx), float(cy), float(radius), float(rotation))


def _outline(spec: ShapeSpec, size: int) -> list[tuple[float, float]]:
    cx, cy, r = spec.cx * size, spec.cy * size, spec.radius * size
    if spec.shape == "square":
        corners, radii = 4, [r]
    elif spec.shape == "triangle":
        corners, radii = 3, [r]
    else:  # star: 10 points alternating outer and inner radius
        corners, radii = 10, [r, r * STAR_INNER_RATIO]
    angles = [spec.rotation + 2 * math.pi * k / corners for k in range(corners)]
    return [(cx + radii[k % len(radii)] * math.cos(a), cy + radii[k % len(radii)] * math.sin(a))
            for k, a in enumerate(angles)]


def coverage(spec: ShapeSpec, size: int = IMAGE_SIZE) -> np.ndarray:
    """Fraction of each output pixel the shape covers, in [0, 1] (drawn at 128, box-filtered)."""
    canvas = Image.new("L", (DRAW_SIZE, DRAW_SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    if spec.shape == "circle":
        cx, cy, r = spec.cx * DRAW_SIZE, spec.cy * DRAW_SIZE, spec.radius * DRAW_SIZE
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_outline(spec, DRAW_SIZE), fill=255)
    small = canvas.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render(spec: ShapeSpec, size: int = IMAGE_SIZE) -> ShapeSample:
    """The image (box-filtered blend of shape and background colours) and the shape mask."""
    cov = coverage(spec, size)[..., None]
    fg = np.asarray(COLORS[spec.color], dtype=np.float32)
    bg = np.asarray(COLORS[spec.background], dtype=np.float32)
    image = np.clip(np.rint(cov * fg + (1.0 - cov) * bg), 0, 255).astype(np.uint8)
    return ShapeSample(spec, image, cov[..., 0] >= 0.5)


def random_sample(seed: int) -> ShapeSample:
    """The image of one seed: the same seed gives the same image everywhere."""
    return render(sample_spec(np.random.default_rng(seed)))


def edit_spec(spec: ShapeSpec, rng: np.random.Generator) -> tuple[ShapeSpec, str]:
    """Swap one word (colour, shape or background) for another valid one; returns (target, attribute)."""
    attribute = ("color", "shape", "background")[rng.integers(3)]
    if attribute == "shape":
        choices = [s for s in SHAPES if s != spec.shape]
    else:
        choices = [c for c in COLORS if c not in (spec.color, spec.background)]
    value = choices[rng.integers(len(choices))]
    return replace(spec, **{attribute: value}), attribute


def sample_specs(rng: np.random.Generator, n: int) -> list[ShapeSpec]:
    """``n`` random specs, e.g. captions (and their colours) for text-to-image probes."""
    return [sample_spec(rng) for _ in range(n)]


def nearest_color(rgb: np.ndarray, exclude: tuple[str, ...] = ()) -> str:
    """Name of the palette colour nearest to ``rgb`` (Euclidean in RGB)."""
    best, best_d = "", float("inf")
    for name, value in COLORS.items():
        if name in exclude:
            continue
        d = float(np.sum((np.asarray(rgb, dtype=np.float64) - np.asarray(value)) ** 2))
        if d < best_d:
            best, best_d = name, d
    return best
