"""Reading a generated or edited shapes-world image back: which colour is the shape, and the background?"""

from __future__ import annotations

from collections import Counter

import numpy as np

from icd.data.shapes import COLORS, nearest_color

# A pixel belongs to the shape region when it is this far (RGB distance) from the background.
REGION_THRESHOLD = 60.0


def shape_region(image: np.ndarray, background: str) -> np.ndarray:
    """Boolean mask of pixels clearly unlike the caption's background colour."""
    diff = image.astype(np.float32) - np.asarray(COLORS[background], dtype=np.float32)
    return np.sqrt((diff ** 2).sum(-1)) > REGION_THRESHOLD


def shape_region_color(image: np.ndarray, background: str) -> str | None:
    """Palette colour nearest the mean of the shape region (background excluded), or None if empty."""
    region = shape_region(image, background)
    if region.sum() < 4:
        return None
    return nearest_color(image[region].mean(0), exclude=(background,))


def background_color(image: np.ndarray, patch: int = 3) -> str:
    """Palette colour most of the four corner patches (``patch`` x ``patch`` pixels) are nearest to.

    A shape can reach one corner; it never covers most of them.
    """
    h, w = image.shape[:2]
    corners = [image[:patch, :patch], image[:patch, w - patch:], image[h - patch:, :patch], image[h - patch:, w - patch:]]
    votes = Counter(nearest_color(c.reshape(-1, 3).astype(np.float64).mean(0)) for c in corners)
    return votes.most_common(1)[0][0]
