"""Editing quality on the shapes world: did the edit happen, and was the rest preserved?

The edits are colour swaps of the shape ("a red circle ..." -> "a blue circle ..."), whose
outcome can be read back from pixels (``icd.evaluation.shapes``). Per image:

- ``inplace_success``: the colour inside the *source's* shape mask of the edited image is the
  target colour: the object changed where it was (a target-coloured blob elsewhere fails);
- ``shape_iou``: IoU of the source's and the edited image's shape masks (it kept its place and form);
- ``background_psnr``: PSNR between the edited and the source image over the source's
  background pixels (the shape region dilated by one pixel is left out: its antialiased edge);
- ``edit_success``: the colour of whatever is not background, anywhere, is the target colour
  (the first metric this project had, kept for continuity: it cannot see a shape that moved).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from icd.data.shapes import COLORS, parse_caption
from icd.evaluation.shapes import color_inside, mask_iou, shape_mask, shape_region, shape_region_color


@dataclass(frozen=True)
class ColorEdit:
    source_prompt: str
    target_prompt: str
    target_color: str
    background: str


def color_edits(captions: list[str], seed: int = 0) -> list[ColorEdit | None]:
    """One colour swap per shapes-world caption (None for captions that are not one), reproducibly."""
    rng = np.random.default_rng(seed)
    edits = []
    for caption in captions:
        parsed = parse_caption(caption)
        if parsed is None:
            edits.append(None)
            continue
        color, shape, background = parsed
        choices = [c for c in COLORS if c not in (color, background)]
        target = choices[int(rng.integers(len(choices)))]
        edits.append(ColorEdit(caption, f"a {target} {shape} on a {background} background", target, background))
    return edits


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def dilate(mask: np.ndarray) -> np.ndarray:
    """Binary dilation by one pixel (3x3 neighbourhood)."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.any([padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)


def edit_scores(source: np.ndarray, edited: np.ndarray, edit: ColorEdit) -> dict[str, float]:
    """Scores of one edit; images (H, W, 3) uint8."""
    source_mask = shape_mask(source, edit.background)
    keep = ~dilate(shape_region(source, edit.background))
    diff = (source[keep].astype(np.float64) - edited[keep].astype(np.float64)) / 255.0
    mse = float((diff ** 2).mean()) if keep.any() else 0.0
    return {
        "inplace_success": float(color_inside(edited, source_mask) == edit.target_color),
        "shape_iou": mask_iou(source_mask, shape_mask(edited, edit.background)),
        "background_psnr": 100.0 if mse == 0 else min(100.0, 10 * np.log10(1.0 / mse)),
        "edit_success": float(shape_region_color(edited, edit.background) == edit.target_color),
    }


# Every per-edit score, in report order.
EDIT_METRICS = ("inplace_success", "shape_iou", "background_psnr", "edit_success")

EditFn = Callable[[torch.Tensor, list[str], list[str]], torch.Tensor]  # (images, sources, targets) -> images


def editing_metrics(edit_fn: EditFn, images: torch.Tensor, captions: list[str], batch_size: int = 32,
                    seed: int = 0) -> dict[str, float]:
    """The mean of each ``edit_scores`` metric over colour edits, and the milliseconds per edit."""
    cases = [(i, e) for i, e in enumerate(color_edits(captions, seed)) if e is not None]
    if not cases:
        raise ValueError("no shapes-world captions to edit")
    scores, elapsed = [], 0.0
    for lo in range(0, len(cases), batch_size):
        chunk = cases[lo:lo + batch_size]
        batch = images[[i for i, _ in chunk]]
        start = time.perf_counter()
        edited = edit_fn(batch, [e.source_prompt for _, e in chunk], [e.target_prompt for _, e in chunk])
        elapsed += time.perf_counter() - start
        for source, result, (_, e) in zip(to_uint8_hwc(batch), to_uint8_hwc(edited), chunk):
            scores.append(edit_scores(source, result, e))
    mean = {k: float(np.mean([s[k] for s in scores])) for k in EDIT_METRICS}
    return {**mean, "ms_per_edit": 1000 * elapsed / len(cases), "edits": len(cases)}
